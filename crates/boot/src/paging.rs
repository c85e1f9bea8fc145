//! Identity page tables for the 64-bit entry.
//!
//! Long mode needs paging, so the boot vCPU starts with page tables that map the first 4 GiB of
//! guest physical memory onto themselves with 2 MiB pages: one PML4 entry, four PDPT entries and
//! four page directories of 512 entries. That covers all RAM below the MMIO gap and the gap itself,
//! so that small test guests can reach device MMIO; a Linux kernel builds its own tables early.

//!
//! The tables are six contiguous pages from the address the caller gives (the
//! [`BootLayout`](crate::BootLayout)'s `page_tables`): the PML4, the PDPT, then the four page
//! directories.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Errors of page table setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tables' address is not page-aligned, or the tables would run past the address space.
    #[error("The boot page tables cannot start at {0:#x}: not page-aligned or too high")]
    BadAddress(u64),
    /// A page table could not be written to guest memory.
    #[error("Cannot write the boot page table at {addr:#x} to guest memory")]
    Write {
        /// Guest physical address of the table.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of page table setup.
pub type Result<T> = std::result::Result<T, Error>;

/// Page table entry bit: the entry is present.
pub const PTE_PRESENT: u64 = 1 << 0;

/// Page table entry bit: the mapping is writable.
pub const PTE_WRITABLE: u64 = 1 << 1;

/// Page directory entry bit: the entry maps a 2 MiB page rather than pointing to a page table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;

/// Number of page directories, each mapping 1 GiB.
pub const PD_COUNT: u64 = 4;

/// Entries per page table.
const ENTRIES: usize = 512;

/// Size of a large page mapped by a page directory entry.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// Size of one page table in bytes.
const TABLE_SIZE: u64 = 0x1000;

/// Bytes the tables occupy: the PML4, the PDPT and the page directories.
// 6 pages: the cast cannot truncate.
pub const TABLES_SIZE: usize = ((2 + PD_COUNT) * TABLE_SIZE) as usize;

/// One table's worth of entries, laid out as guest memory holds them.
fn table_bytes(entries: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut bytes = vec![0u8; ENTRIES * 8];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    bytes
}

fn write_table<M: GuestMemory>(mem: &M, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::Write { addr, source })
}

/// Writes the identity page tables from `base` ([`TABLES_SIZE`] bytes) and returns the value
/// for CR3 (the PML4's address, `base`).
///
/// Every table is written whole, so entries past the mapped range are zero (not present) whatever
/// the memory held before.
///
/// # Errors
///
/// [`Error::BadAddress`] when `base` is not page-aligned or the tables would run past the address
/// space; [`Error::Write`] when guest memory does not hold them.
pub fn setup_identity_paging<M: GuestMemory>(mem: &M, base: GuestAddress) -> Result<u64> {
    let pml4 = base.0;
    // TABLES_SIZE is a few pages: the cast cannot truncate.
    if pml4 % TABLE_SIZE != 0 || pml4.checked_add(TABLES_SIZE as u64).is_none() {
        return Err(Error::BadAddress(pml4));
    }
    // Cannot overflow: checked above.
    let pdpt = pml4 + TABLE_SIZE;
    let pd_start = pdpt + TABLE_SIZE;
    let flags = PTE_PRESENT | PTE_WRITABLE;
    write_table(mem, pml4, &table_bytes(std::iter::once(pdpt | flags)))?;
    write_table(
        mem,
        pdpt,
        &table_bytes((0..PD_COUNT).map(|i| (pd_start + i * TABLE_SIZE) | flags)),
    )?;
    for pd in 0..PD_COUNT {
        let first_page = pd * ENTRIES as u64;
        let entries = (first_page..first_page + ENTRIES as u64)
            .map(|page| (page * LARGE_PAGE_SIZE) | flags | PTE_PAGE_SIZE);
        write_table(mem, pd_start + pd * TABLE_SIZE, &table_bytes(entries))?;
    }
    Ok(pml4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Physical address bits 12..52 of a table entry.
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

    fn entry(mem: &GuestMemoryMmap, table: u64, index: u64) -> u64 {
        mem.read_obj::<u64>(GuestAddress(table + index * 8))
            .unwrap()
    }

    /// Translates `va` the way the MMU does with 4-level paging and 2 MiB pages.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e = entry(mem, cr3 & ADDR_MASK, (va >> 39) & 0x1ff);
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = entry(mem, pml4e & ADDR_MASK, (va >> 30) & 0x1ff);
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        assert_eq!(pdpte & PTE_PAGE_SIZE, 0, "no 1 GiB pages are used");
        let pde = entry(mem, pdpte & ADDR_MASK, (va >> 21) & 0x1ff);
        if pde & PTE_PRESENT == 0 {
            return None;
        }
        assert_ne!(pde & PTE_PAGE_SIZE, 0, "page directories map 2 MiB pages");
        Some((pde & ADDR_MASK & !(LARGE_PAGE_SIZE - 1)) | (va & (LARGE_PAGE_SIZE - 1)))
    }

    const PML4: u64 = 0x9000;
    const PDPT: u64 = PML4 + TABLE_SIZE;
    const PD: u64 = PDPT + TABLE_SIZE;

    fn setup(mem: &GuestMemoryMmap) -> Result<u64> {
        setup_identity_paging(mem, GuestAddress(PML4))
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn identity_map_translates_addresses_below_4_gib_to_themselves() {
        let mem = memory();
        let cr3 = setup(&mem).unwrap();
        assert_eq!(cr3, PML4);
        for va in [
            0,
            0x1234,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xd000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "address {va:#x}");
        }
    }

    #[test]
    fn nothing_is_mapped_from_4_gib() {
        let mem = memory();
        mem.write_slice(&[0xff; 0x1000], GuestAddress(PML4))
            .unwrap();
        mem.write_slice(&[0xff; 0x1000], GuestAddress(PDPT))
            .unwrap();
        let cr3 = setup(&mem).unwrap();
        assert_eq!(translate(&mem, cr3, 1 << 32), None);
        assert_eq!(translate(&mem, cr3, 1 << 39), None);
    }

    #[test]
    fn mappings_are_present_and_writable() {
        let mem = memory();
        let cr3 = setup(&mem).unwrap();
        let pml4e = entry(&mem, cr3, 0);
        assert_eq!(
            pml4e & (PTE_PRESENT | PTE_WRITABLE),
            PTE_PRESENT | PTE_WRITABLE
        );
        let pde = entry(&mem, PD + 3 * TABLE_SIZE, 511);
        assert_eq!(
            pde,
            0xffe0_0000 | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
        );
    }

    #[test]
    fn page_tables_need_low_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        let err = setup(&mem).unwrap_err();
        assert!(matches!(err, Error::Write { addr: PML4, .. }));
    }

    #[test]
    fn tables_go_where_the_caller_says() {
        let mem = memory();
        let cr3 = setup_identity_paging(&mem, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(cr3, 0x4_0000);
        assert_eq!(
            entry(&mem, cr3, 0) & ADDR_MASK,
            0x4_1000,
            "PDPT follows the PML4"
        );
        assert_eq!(translate(&mem, cr3, 0xfee0_0000), Some(0xfee0_0000));
    }

    #[test]
    fn unaligned_or_overflowing_addresses_are_rejected() {
        let mem = memory();
        for base in [0x9008, !0xfff] {
            assert!(matches!(
                setup_identity_paging(&mem, GuestAddress(base)),
                Err(Error::BadAddress(b)) if b == base
            ));
        }
    }
}
