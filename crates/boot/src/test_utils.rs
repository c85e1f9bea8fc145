//! Tiny guest kernel images, for tests and benchmarks that need something to load and run.
//!
//! Each builder wraps raw machine code in a minimal, valid image that [`load_kernel`] accepts and
//! places so that the code is the first thing executed:
//!
//! - [`tiny_elf`]: an ELF64 with one loadable segment at [`TINY_LOAD_ADDR`] (1 MiB); the code is
//!   entered in 64-bit mode.
//! - [`tiny_pvh_elf`]: the same with a PVH note pointing at the code, entered in 32-bit protected
//!   mode.
//! - [`tiny_bzimage`]: a bzImage (boot protocol 2.15) whose 64-bit entry runs the code.
//!
//! And readers of what the crate wrote, for tests that check the tables: [`read`] a range of
//! guest memory, take little-endian fields out of it ([`u16_at`], [`u32_at`], [`u64_at`]), and
//! find an [`acpi_table`] with its signature and checksum checked.
//!
//! [`load_kernel`]: crate::load_kernel

use vm_memory::{Bytes, GuestAddress};

use crate::layout::HIMEM_START;

/// Where the tiny images' code is loaded (and, for the ELF images, entered).
pub const TINY_LOAD_ADDR: u64 = HIMEM_START;

/// ELF note type of the PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_R: u32 = 4;

fn align_up(len: usize, align: usize) -> usize {
    len.div_ceil(align) * align
}

fn push_phdr(out: &mut Vec<u8>, kind: u32, flags: u32, offset: usize, addr: u64, size: usize) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(offset as u64).to_le_bytes());
    out.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    out.extend_from_slice(&(size as u64).to_le_bytes()); // p_filesz
    out.extend_from_slice(&(size as u64).to_le_bytes()); // p_memsz
    out.extend_from_slice(&16u64.to_le_bytes()); // p_align
}

/// Encodes one ELF note: header, name with its NUL, descriptor, each padded to 4 bytes.
pub fn elf_note(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
    let name_len = name.len() + 1;
    let mut note = Vec::new();
    note.extend_from_slice(&(name_len as u32).to_le_bytes());
    note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    note.extend_from_slice(&kind.to_le_bytes());
    note.extend_from_slice(name.as_bytes());
    note.resize(align_up(note.len() + 1, 4), 0);
    note.extend_from_slice(desc);
    note.resize(align_up(note.len(), 4), 0);
    note
}

/// An ELF64 x86_64 executable with `code` as its one loadable segment at [`TINY_LOAD_ADDR`],
/// entered at its first byte, and with `notes` (encoded with [`elf_note`], concatenated) in a
/// `PT_NOTE` segment when not empty.
pub fn tiny_elf_with_notes(code: &[u8], notes: &[u8]) -> Vec<u8> {
    let phnum: u16 = if notes.is_empty() { 1 } else { 2 };
    let notes_offset = EHDR_SIZE + usize::from(phnum) * PHDR_SIZE;
    let code_offset = align_up(notes_offset + notes.len(), 16);

    let mut image = Vec::with_capacity(code_offset + code.len());
    image.extend_from_slice(b"\x7fELF");
    image.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V ABI
    image.resize(16, 0);
    image.extend_from_slice(&2u16.to_le_bytes()); // e_type: executable
    image.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86_64
    image.extend_from_slice(&1u32.to_le_bytes()); // e_version
    image.extend_from_slice(&TINY_LOAD_ADDR.to_le_bytes()); // e_entry
    image.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    image.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    image.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    image.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    image.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    image.extend_from_slice(&phnum.to_le_bytes());
    image.extend_from_slice(&[0; 6]); // no section headers
    push_phdr(
        &mut image,
        PT_LOAD,
        PF_R | PF_X,
        code_offset,
        TINY_LOAD_ADDR,
        code.len(),
    );
    if !notes.is_empty() {
        push_phdr(&mut image, PT_NOTE, PF_R, notes_offset, 0, notes.len());
    }
    image.extend_from_slice(notes);
    image.resize(code_offset, 0);
    image.extend_from_slice(code);
    image
}

/// An ELF64 x86_64 executable with `code` loaded at [`TINY_LOAD_ADDR`] and entered at its first
/// byte in 64-bit mode.
///
/// # Example
///
/// ```
/// use std::io::Cursor;
/// use ember_boot::{KernelFormat, load_kernel, test_utils::{TINY_LOAD_ADDR, tiny_elf}};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
/// let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4])))?; // hlt
/// assert_eq!(kernel.format, KernelFormat::Elf);
/// assert_eq!(kernel.entry, GuestAddress(TINY_LOAD_ADDR));
/// assert_eq!(mem.read_obj::<u8>(kernel.entry).unwrap(), 0xf4);
/// # Ok::<(), ember_boot::kernel::Error>(())
/// ```
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    tiny_elf_with_notes(code, &[])
}

/// Like [`tiny_elf`], with a PVH note whose entry point is the first byte of `code`, which is
/// then entered in 32-bit protected mode.
pub fn tiny_pvh_elf(code: &[u8]) -> Vec<u8> {
    // TINY_LOAD_ADDR is 1 MiB; Linux encodes the entry in a 64-bit descriptor.
    let note = elf_note(
        "Xen",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &TINY_LOAD_ADDR.to_le_bytes(),
    );
    tiny_elf_with_notes(code, &note)
}

/// File offset of the protected-mode kernel in [`tiny_bzimage`] images: boot sector plus one
/// setup sector.
pub const TINY_BZIMAGE_SETUP_SIZE: usize = 1024;

/// A bzImage whose protected-mode kernel (loaded at [`TINY_LOAD_ADDR`]) holds `hlt` up to the
/// 64-bit entry 0x200 bytes in, then `code`.
///
/// The setup header declares boot protocol 2.15, a 64-bit entry, a kernel that is loaded high
/// and not relocatable, `initrd_addr_max` 0x7fff_ffff, and a decompression buffer (`init_size`
/// from `pref_address` 1 MiB) exactly the size of the kernel.
pub fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
    let kernel_len = 0x200 + code.len();
    let mut image = vec![0u8; TINY_BZIMAGE_SETUP_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0x1f1, &[1]); // setup_sects
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes()); // version 2.15
    put(0x211, &[1]); // loadflags: LOADED_HIGH
    put(0x214, &(TINY_LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(0x258, &TINY_LOAD_ADDR.to_le_bytes()); // pref_address
    put(0x260, &(kernel_len as u32).to_le_bytes()); // init_size
    image.resize(TINY_BZIMAGE_SETUP_SIZE + 0x200, 0xf4);
    image.extend_from_slice(code);
    image
}

/// The `len` bytes of guest memory at `addr`.
///
/// # Panics
///
/// When they are not all in guest memory.
pub fn read<M: Bytes<GuestAddress>>(mem: &M, addr: u64, len: usize) -> Vec<u8>
where
    M::E: std::fmt::Debug,
{
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .expect("the range is in guest memory");
    bytes
}

/// The little-endian `u16` at `offset` in `bytes`.
///
/// # Panics
///
/// When `bytes` ends before it.
pub fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(field(bytes, offset))
}

/// The little-endian `u32` at `offset` in `bytes`.
///
/// # Panics
///
/// When `bytes` ends before it.
pub fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(field(bytes, offset))
}

/// The little-endian `u64` at `offset` in `bytes`.
///
/// # Panics
///
/// When `bytes` ends before it.
pub fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(field(bytes, offset))
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    bytes[offset..offset + N]
        .try_into()
        .expect("the range is N bytes long")
}

/// Whether `bytes` add up to 0 modulo 256, as a table with a checksum byte does.
pub fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// The ACPI table at `addr`, whole, once its signature and checksum are checked.
///
/// # Panics
///
/// When the signature is not `signature`, the checksum is wrong, or the table is not in guest
/// memory.
pub fn acpi_table<M: Bytes<GuestAddress>>(mem: &M, addr: u64, signature: &[u8; 4]) -> Vec<u8>
where
    M::E: std::fmt::Debug,
{
    let header = read(mem, addr, 36);
    assert_eq!(&header[..4], signature);
    let len = usize::try_from(u32_at(&header, 4)).expect("a table length fits in usize");
    let table = read(mem, addr, len);
    assert!(sums_to_zero(&table), "{signature:?} checksum");
    table
}
