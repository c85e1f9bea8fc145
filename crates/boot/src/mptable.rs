//! The Intel MultiProcessor Specification (1.4) table, which tells the kernel how many CPUs the
//! guest has and how legacy interrupts reach the I/O APIC.
//!
//! The table is written where the [`BootLayout`](crate::BootLayout) says (ember's is the start
//! of the EBDA, where Linux looks for the MP floating pointer) and consists of:
//!
//! - the MP floating pointer structure, pointing to
//! - the MP configuration table: its header, then one processor entry per vCPU (the first one the
//!   bootstrap processor), one ISA bus, the I/O APIC, an I/O interrupt entry for each of its
//!   lines, and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).
//!
//! Both structures carry checksums that make their bytes sum to zero. Local APIC ids are the vCPU
//! indexes, and the I/O APIC takes the id after the last vCPU's. The APIC addresses and the
//! number of I/O APIC lines come from the [`Platform`].

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::config::Platform;

/// Errors of MP table setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest needs at least one vCPU.
    #[error("The MP table needs at least one vCPU")]
    NoVcpus,
    /// The vCPUs and the I/O APIC would not all get distinct APIC ids below the broadcast id.
    #[error("{0} vCPUs are more than the {MAX_VCPUS} the MP table can describe")]
    TooManyVcpus(u8),
    /// The table or an APIC is not below 4 GiB, where the table's 32-bit pointers reach.
    #[error("The {what} at {addr:#x} is beyond the MP table's 32-bit reach")]
    Above4GiB {
        /// The table or the APIC.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// The table could not be written to guest memory.
    #[error("Cannot write the MP table to guest memory at {addr:#x}")]
    Write {
        /// Where the table goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of MP table setup.
pub type Result<T> = std::result::Result<T, Error>;

/// Most vCPUs the table describes: APIC ids 0..=253 for the vCPUs, 254 for the I/O APIC, 255 is
/// the broadcast id.
pub const MAX_VCPUS: u8 = 254;

/// Size of the MP floating pointer structure.
pub const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the MP configuration table header.
pub const CONFIG_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Size of the bus, I/O APIC, I/O interrupt and local interrupt entries.
pub const SMALL_ENTRY_SIZE: usize = 8;

/// MP specification revision 1.4.
const SPEC_REVISION: u8 = 4;
/// Local APIC version reported for every CPU and the I/O APIC (integrated APIC).
const APIC_VERSION: u8 = 0x14;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const IOAPIC_USABLE: u8 = 1;

const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus".
const IRQ_FLAGS_CONFORMING: u16 = 0;
/// Local interrupt destination meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

const ISA_BUS_ID: u8 = 0;

/// Value that makes `bytes` sum to zero (mod 256) once added.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// Total size of the floating pointer and configuration table for `vcpus` processors and an I/O
/// APIC of `ioapic_pins` lines.
pub const fn mptable_size(vcpus: u8, ioapic_pins: u8) -> usize {
    // Widening casts (`usize::from` is not const).
    FLOATING_POINTER_SIZE
        + CONFIG_HEADER_SIZE
        + vcpus as usize * PROCESSOR_ENTRY_SIZE
        // Bus, I/O APIC, one I/O interrupt per line, two local interrupts.
        + (2 + ioapic_pins as usize + 2) * SMALL_ENTRY_SIZE
}

/// Builds the floating pointer and configuration table, as guest memory will hold them at
/// `base`, for `vcpus` processors (at least 1, at most [`MAX_VCPUS`], checked by the caller), an
/// I/O APIC at `ioapic` with `ioapic_pins` lines and the local APICs at `lapic`.
fn build(base: u32, vcpus: u8, ioapic: u32, ioapic_pins: u8, lapic: u32) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = if cpu == 0 {
            CPU_ENABLED | CPU_BOOTSTRAP
        } else {
            CPU_ENABLED
        };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, IOAPIC_USABLE]);
    entries.extend_from_slice(&ioapic.to_le_bytes());
    count += 1;
    for line in 0..ioapic_pins {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, line, ioapic_id, line]);
        count += 1;
    }
    for (kind, destination, lint) in [
        (INTERRUPT_EXTINT, 0, 0),
        (INTERRUPT_NMI, ALL_LOCAL_APICS, 1),
    ] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, destination, lint]);
        count += 1;
    }

    // The caller checked that the whole table lies below 4 GiB: cannot overflow.
    let config_base = base + FLOATING_POINTER_SIZE as u32;
    // At most mptable_size(MAX_VCPUS, 255), about 7 KiB: fits in u16.
    let config_len = (CONFIG_HEADER_SIZE + entries.len()) as u16;
    let mut config = Vec::with_capacity(usize::from(config_len));
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&config_len.to_le_bytes());
    config.extend_from_slice(&[SPEC_REVISION, 0]);
    config.extend_from_slice(b"EMBER   ");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&lapic.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes()); // extended table length and checksum
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(FLOATING_POINTER_SIZE + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_base.to_le_bytes());
    // Length in 16-byte units, revision, checksum, then feature bytes: 0 means a configuration
    // table is present.
    table.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    table
}

/// Writes the MP table for `vcpus` vCPUs on `platform` at `base`.
///
/// # Errors
///
/// [`Error::NoVcpus`] or [`Error::TooManyVcpus`] when `vcpus` is 0 or above [`MAX_VCPUS`];
/// [`Error::Above4GiB`] when the table or an APIC is not below 4 GiB; [`Error::Write`] when guest
/// memory does not hold the table's addresses.
pub fn setup_mptable<M: GuestMemory>(
    mem: &M,
    base: GuestAddress,
    vcpus: u8,
    platform: &Platform,
) -> Result<()> {
    if vcpus == 0 {
        return Err(Error::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(Error::TooManyVcpus(vcpus));
    }
    let below_4_gib = |what, addr: u64, size: u64| {
        addr.checked_add(size)
            .filter(|end| *end <= 1 << 32)
            .and_then(|_| u32::try_from(addr).ok())
            .ok_or(Error::Above4GiB { what, addr })
    };
    let size = mptable_size(vcpus, platform.ioapic_pins);
    // A few KiB: the cast cannot truncate.
    let table_base = below_4_gib("MP table", base.0, size as u64)?;
    let ioapic = below_4_gib("I/O APIC", platform.ioapic, 0)?;
    let lapic = below_4_gib("local APIC", platform.lapic, 0)?;
    let table = build(table_base, vcpus, ioapic, platform.ioapic_pins, lapic);
    mem.write_slice(&table, base)
        .map_err(|source| Error::Write {
            addr: base.0,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_platform as platform;
    use crate::test_utils::read;
    use vm_memory::GuestMemoryMmap;

    const MPTABLE_START: u64 = 0x9_fc00;
    const IOAPIC_START: u64 = 0xfec0_0000;
    const LAPIC_START: u64 = 0xfee0_0000;
    const IOAPIC_LINES: u8 = 24;

    fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<()> {
        super::setup_mptable(mem, GuestAddress(MPTABLE_START), vcpus, &platform())
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// The configuration table written for `vcpus`, as guest memory holds it.
    fn config_table(mem: &GuestMemoryMmap) -> Vec<u8> {
        let fp = read(mem, MPTABLE_START, FLOATING_POINTER_SIZE);
        let base = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let header = read(mem, base, CONFIG_HEADER_SIZE);
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        read(mem, base, len)
    }

    /// The entries of a configuration table, as (type, bytes) pairs.
    fn entries(config: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = &config[CONFIG_HEADER_SIZE..];
        while let Some(&kind) = rest.first() {
            let size = if kind == ENTRY_PROCESSOR {
                PROCESSOR_ENTRY_SIZE
            } else {
                SMALL_ENTRY_SIZE
            };
            out.push((kind, rest[..size].to_vec()));
            rest = &rest[size..];
        }
        out
    }

    #[test]
    fn floating_pointer_is_valid_and_points_to_the_table() {
        let mem = memory();
        setup_mptable(&mem, 2).unwrap();
        let fp = read(&mem, MPTABLE_START, FLOATING_POINTER_SIZE);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(fp[4..8].try_into().unwrap()),
            MPTABLE_START as u32 + 16
        );
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], 4);
        assert_eq!(sum(&fp), 0);
    }

    #[test]
    fn configuration_table_checksum_and_header_are_valid() {
        let mem = memory();
        for vcpus in [1, 4, MAX_VCPUS] {
            setup_mptable(&mem, vcpus).unwrap();
            let config = config_table(&mem);
            assert_eq!(&config[0..4], b"PCMP");
            assert_eq!(
                config.len() + FLOATING_POINTER_SIZE,
                mptable_size(vcpus, IOAPIC_LINES)
            );
            assert_eq!(sum(&config), 0, "checksum with {vcpus} vCPUs");
            let lapic = u32::from_le_bytes(config[36..40].try_into().unwrap());
            assert_eq!(u64::from(lapic), LAPIC_START);
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(usize::from(count), entries(&config).len());
        }
    }

    #[test]
    fn one_processor_entry_per_vcpu_with_the_first_as_bootstrap() {
        let mem = memory();
        setup_mptable(&mem, 3).unwrap();
        let cpus: Vec<_> = entries(&config_table(&mem))
            .into_iter()
            .filter(|(kind, _)| *kind == ENTRY_PROCESSOR)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(cpus.len(), 3);
        for (id, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu[1]), id, "APIC id");
            assert_ne!(cpu[3] & CPU_ENABLED, 0);
            assert_eq!(cpu[3] & CPU_BOOTSTRAP != 0, id == 0);
        }
    }

    #[test]
    fn ioapic_follows_the_vcpus_and_routes_every_line() {
        let mem = memory();
        setup_mptable(&mem, 2).unwrap();
        let all = entries(&config_table(&mem));
        let ioapic: Vec<_> = all.iter().filter(|(k, _)| *k == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        let ioapic = &ioapic[0].1;
        assert_eq!(ioapic[1], 2, "I/O APIC id is the vCPU count");
        assert_eq!(ioapic[3], IOAPIC_USABLE);
        assert_eq!(
            u64::from(u32::from_le_bytes(ioapic[4..8].try_into().unwrap())),
            IOAPIC_START
        );
        let lines: Vec<_> = all
            .iter()
            .filter(|(k, _)| *k == ENTRY_IO_INTERRUPT)
            .map(|(_, e)| (e[5], e[6], e[7]))
            .collect();
        let expected: Vec<_> = (0..IOAPIC_LINES).map(|line| (line, 2, line)).collect();
        assert_eq!(lines, expected);
        let bus: Vec<_> = all.iter().filter(|(k, _)| *k == ENTRY_BUS).collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0].1[2..8], b"ISA   ");
    }

    #[test]
    fn local_interrupts_are_extint_on_lint0_and_nmi_on_lint1() {
        let mem = memory();
        setup_mptable(&mem, 1).unwrap();
        let lints: Vec<_> = entries(&config_table(&mem))
            .into_iter()
            .filter(|(k, _)| *k == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            lints,
            vec![
                (INTERRUPT_EXTINT, 0, 0),
                (INTERRUPT_NMI, ALL_LOCAL_APICS, 1)
            ]
        );
    }

    #[test]
    fn vcpu_count_out_of_range_is_rejected() {
        let mem = memory();
        assert!(matches!(setup_mptable(&mem, 0), Err(Error::NoVcpus)));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(Error::TooManyVcpus(255))
        ));
        assert!(setup_mptable(&mem, MAX_VCPUS).is_ok());
    }

    #[test]
    fn table_needs_the_ebda_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_f000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(Error::Write {
                addr: MPTABLE_START,
                ..
            })
        ));
    }

    #[test]
    fn table_describes_the_platform_it_is_given() {
        let mem = memory();
        let mut platform = platform();
        platform.ioapic = 0xfe00_0000;
        platform.lapic = 0xfed0_0000;
        platform.ioapic_pins = 48;
        super::setup_mptable(&mem, GuestAddress(0x1000), 2, &platform).unwrap();
        let fp = read(&mem, 0x1000, FLOATING_POINTER_SIZE);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0x1010);
        let base = 0x1010;
        let header = read(&mem, base, CONFIG_HEADER_SIZE);
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        let config = read(&mem, base, len);
        assert_eq!(sum(&config), 0);
        assert_eq!(
            u32::from_le_bytes(config[36..40].try_into().unwrap()),
            0xfed0_0000
        );
        let all = entries(&config);
        let ioapic = &all.iter().find(|(k, _)| *k == ENTRY_IOAPIC).unwrap().1;
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfe00_0000
        );
        let lines = all.iter().filter(|(k, _)| *k == ENTRY_IO_INTERRUPT).count();
        assert_eq!(lines, 48);
    }

    #[test]
    fn table_or_apic_beyond_4_gib_is_rejected() {
        let mem = memory();
        let err = super::setup_mptable(&mem, GuestAddress((1 << 32) - 0x100), 1, &platform())
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Above4GiB {
                what: "MP table",
                ..
            }
        ));
        let mut platform = platform();
        platform.lapic = 1 << 32;
        let err =
            super::setup_mptable(&mem, GuestAddress(MPTABLE_START), 1, &platform).unwrap_err();
        assert!(matches!(
            err,
            Error::Above4GiB {
                what: "local APIC",
                ..
            }
        ));
    }
}
