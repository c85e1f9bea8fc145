//! Segment descriptors: the boot GDT and IDT, and the segment registers they imply.
//!
//! The boot vCPU's segment registers are loaded straight from the same descriptors that are
//! written to the guest's GDT, so that a kernel that reloads its segments from the GDT finds what
//! it already runs with.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::cpu::{DescriptorTable, Segment};

/// Errors of descriptor table setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The GDT could not be written to guest memory.
    #[error("Cannot write the GDT to guest memory at {addr:#x}")]
    WriteGdt {
        /// Where the GDT goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
    /// The IDT could not be written to guest memory.
    #[error("Cannot write the IDT to guest memory at {addr:#x}")]
    WriteIdt {
        /// Where the IDT goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of descriptor table setup.
pub type Result<T> = std::result::Result<T, Error>;

/// Flags (access byte and the flags nibble, as `0xF0AA`) of a 64-bit code segment: present,
/// ring 0, execute/read, accessed, long mode, 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;

/// Flags of a 32-bit flat code segment: present, ring 0, execute/read, accessed, 32-bit, 4 KiB
/// granularity.
pub const CODE32_FLAGS: u16 = 0xc09b;

/// Flags of a flat data segment: present, ring 0, read/write, accessed, 32-bit, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;

/// Flags of the 64-bit boot TSS: present, busy TSS, 4 KiB granularity.
pub const TSS64_FLAGS: u16 = 0x808b;

/// Flags of the 32-bit boot TSS: present, busy TSS, byte granularity.
pub const TSS32_FLAGS: u16 = 0x008b;

/// GDT index of the code segment.
pub const CODE_INDEX: u8 = 1;

/// GDT index of the data segment.
pub const DATA_INDEX: u8 = 2;

/// GDT index of the task state segment.
pub const TSS_INDEX: u8 = 3;

/// Number of entries of the boot GDT: null, code, data, TSS.
pub const GDT_ENTRIES: usize = 4;

/// Encodes a segment descriptor.
///
/// `flags` holds the access byte in bits 0..8 and the flags nibble (G, D/B, L, AVL) in bits
/// 12..16; `limit` is the 20-bit descriptor limit (higher bits are dropped).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// Extracts bit `shift` of a descriptor.
fn bit(entry: u64, shift: u32) -> bool {
    (entry >> shift) & 1 == 1
}

/// Decodes the descriptor `entry`, found at `index` in the GDT, into a segment register.
///
/// The limit is expanded to bytes when the granularity bit is set, which is how KVM's
/// `kvm_segment` holds it. A descriptor that is not present gives an unusable segment.
pub fn segment_from_gdt(entry: u64, index: u8) -> Segment {
    let base = ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff);
    // Masked to 20 bits: the casts below cannot truncate.
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let granularity = bit(entry, 55);
    let limit = if granularity {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(entry, 47);
    Segment {
        base,
        limit,
        selector: u16::from(index) << 3,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        granularity,
        avl: bit(entry, 52),
        unusable: !present,
    }
}

/// The boot GDT of the 64-bit Linux entry: null, 64-bit code, data, TSS.
pub fn long_mode_gdt() -> [u64; GDT_ENTRIES] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS64_FLAGS, 0, 0xfffff),
    ]
}

/// The boot GDT of the PVH entry: null, flat 32-bit code, flat data, TSS.
pub fn protected_mode_gdt() -> [u64; GDT_ENTRIES] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(CODE32_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS32_FLAGS, 0, 0x67),
    ]
}

/// Writes `gdt` at `gdt_addr` and an empty IDT at `idt_addr`, and returns the GDTR and IDTR
/// values that describe them.
///
/// # Errors
///
/// [`Error::WriteGdt`] or [`Error::WriteIdt`] when guest memory does not hold those addresses.
pub fn write_descriptor_tables<M: GuestMemory>(
    mem: &M,
    gdt: &[u64; GDT_ENTRIES],
    gdt_addr: GuestAddress,
    idt_addr: GuestAddress,
) -> Result<(DescriptorTable, DescriptorTable)> {
    let mut bytes = [0u8; GDT_ENTRIES * 8];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(gdt) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, gdt_addr)
        .map_err(|source| Error::WriteGdt {
            addr: gdt_addr.0,
            source,
        })?;
    mem.write_slice(&0u64.to_le_bytes(), idt_addr)
        .map_err(|source| Error::WriteIdt {
            addr: idt_addr.0,
            source,
        })?;
    let gdtr = DescriptorTable {
        base: gdt_addr.0,
        // 31: fits in u16.
        limit: (bytes.len() - 1) as u16,
    };
    let idtr = DescriptorTable {
        base: idt_addr.0,
        limit: 7,
    };
    Ok((gdtr, idtr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const GDT_START: u64 = 0x500;
    const IDT_START: u64 = 0x520;

    fn write(mem: &GuestMemoryMmap) -> Result<(DescriptorTable, DescriptorTable)> {
        write_descriptor_tables(
            mem,
            &long_mode_gdt(),
            GuestAddress(GDT_START),
            GuestAddress(IDT_START),
        )
    }

    #[test]
    fn long_mode_code_segment_decodes_as_64_bit_ring_0() {
        let cs = segment_from_gdt(long_mode_gdt()[1], CODE_INDEX);
        assert_eq!(cs.selector, 0x8);
        assert_eq!(cs.type_, 0xb);
        assert!(cs.present && cs.s && cs.l && cs.granularity);
        assert!(!cs.db, "a long mode code segment must have D clear");
        assert_eq!(cs.dpl, 0);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert!(!cs.unusable);
    }

    #[test]
    fn data_segment_decodes_as_flat_read_write() {
        let ds = segment_from_gdt(long_mode_gdt()[2], DATA_INDEX);
        assert_eq!(ds.selector, 0x10);
        assert_eq!(ds.type_, 0x3);
        assert!(ds.present && ds.s && ds.db && ds.granularity);
        assert!(!ds.l);
        assert_eq!(ds.limit, 0xffff_ffff);
    }

    #[test]
    fn protected_mode_code_segment_is_32_bit() {
        let cs = segment_from_gdt(protected_mode_gdt()[1], CODE_INDEX);
        assert_eq!(cs.type_, 0xb);
        assert!(cs.db && !cs.l && cs.granularity);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn tss_is_a_busy_system_segment() {
        let tr = segment_from_gdt(long_mode_gdt()[3], TSS_INDEX);
        assert_eq!(tr.selector, 0x18);
        assert_eq!(tr.type_, 0xb);
        assert!(tr.present && !tr.s);
        let tr32 = segment_from_gdt(protected_mode_gdt()[3], TSS_INDEX);
        assert_eq!(tr32.limit, 0x67);
        assert!(!tr32.granularity);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let null = segment_from_gdt(0, 0);
        assert!(null.unusable && !null.present);
    }

    #[test]
    fn base_and_limit_round_trip_through_the_descriptor() {
        let entry = gdt_entry(0x409b, 0x1234_5678, 0xa_bcde);
        let seg = segment_from_gdt(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xa_bcde);
        assert_eq!(seg.selector, 5 << 3);
        assert!(!seg.granularity);
    }

    #[test]
    fn descriptor_tables_are_written_where_the_registers_point() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[0xff; 8], GuestAddress(IDT_START))
            .unwrap();
        let gdt = long_mode_gdt();
        let (gdtr, idtr) = write(&mem).unwrap();
        assert_eq!(gdtr.base, GDT_START);
        assert_eq!(gdtr.limit, 31);
        for (i, entry) in gdt.iter().enumerate() {
            let addr = GuestAddress(gdtr.base + 8 * i as u64);
            assert_eq!(mem.read_obj::<u64>(addr).unwrap(), *entry);
        }
        assert_eq!(idtr.base, IDT_START);
        assert_eq!(idtr.limit, 7);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(IDT_START)).unwrap(), 0);
    }

    #[test]
    fn descriptor_tables_need_low_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        let err = write(&mem).unwrap_err();
        assert!(matches!(
            err,
            Error::WriteGdt {
                addr: GDT_START,
                ..
            }
        ));
    }
}
