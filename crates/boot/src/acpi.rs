//! The ACPI tables through which a Linux guest powers itself off.
//!
//! Without a power-off method, Linux turns `poweroff` into a halt and the guest stops forever
//! without the VMM noticing. These tables give it the ACPI one: Linux finds the RSDP, follows
//! the XSDT to the FADT, which places the PM1a event and control registers on the I/O ports of
//! the [`Platform`]'s [`AcpiPm`](crate::AcpiPm), and evaluates the DSDT's `\_S5_` object for the soft-off sleep type
//! [`S5_SLEEP_TYPE`]. Powering off is then a write of that sleep type with "sleep enable" to the
//! PM1a control register, which the VMM's PM device turns into a clean stop.
//!
//! A kernel that uses ACPI takes its CPUs and interrupt controllers from the MADT and ignores the
//! MP table, so the MADT says what the MP table says: one local APIC per vCPU (APIC id = vCPU
//! index), the I/O APIC after them with its lines identity-mapped from GSI 0 (no overrides, as
//! KVM routes them), the legacy PICs present, and NMI on every CPU's LINT1. The FADT says there is
//! an i8042 (so that Linux probes its keyboard, through which the VMM sends Ctrl+Alt+Del, without
//! a PNP entry for it), and no VGA, no CMOS clock and no MSI.
//!
//! The tables go where the [`BootLayout`](crate::BootLayout) says (ember's: 0xe0000, in the BIOS
//! area Linux scans), `base` below:
//!
//! ```text
//! base + 0x000  RSDP (revision 2)  -> XSDT
//! base + 0x040  FACS
//! base + 0x080  XSDT               -> FADT, MADT
//! base + 0x0c0  FADT (revision 6)  -> FACS, DSDT, PM1a event/control ports, SCI
//! base + 0x200  DSDT               Name (_S5_, Package () { 5, 0, 0, 0 })
//! base + 0x280  MADT               local APICs, I/O APIC, LINT1 NMI
//! ```

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::config::{PM1_CNT_LEN, PM1_EVT_LEN, Platform};
use crate::mptable::{MAX_VCPUS, checksum};

/// Errors of ACPI table setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The MADT describes 1 to [`MAX_VCPUS`] vCPUs, as the MP table does.
    #[error("The ACPI tables cannot describe {0} vCPUs (1 to {MAX_VCPUS})")]
    VcpuCount(u8),
    /// The tables' address is not 64-byte aligned, as the FACS that follows the RSDP must be.
    #[error("The ACPI tables at {0:#x} are not 64-byte aligned")]
    Misaligned(u64),
    /// The tables or an APIC are not below 4 GiB, where the tables' 32-bit pointers reach.
    #[error("The {what} at {addr:#x} is beyond the ACPI tables' 32-bit reach")]
    Above4GiB {
        /// The tables or the APIC.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// The SCI line does not fit the FADT's 16-bit field.
    #[error("The SCI line {0} does not fit in the FADT")]
    Sci(u32),
    /// The tables could not be written to guest memory.
    #[error("Cannot write the ACPI tables to guest memory at {addr:#x}")]
    Write {
        /// Where the tables go.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of ACPI table setup.
pub type Result<T> = std::result::Result<T, Error>;

/// The sleep type of the soft-off state (S5) in the DSDT's `\_S5_` package: the value a guest
/// writes to the SLP_TYP field of the PM1a control register to power off.
pub const S5_SLEEP_TYPE: u16 = 5;

const RSDP_OFFSET: u64 = 0;
const FACS_OFFSET: u64 = 0x40;
const XSDT_OFFSET: u64 = 0x80;
const FADT_OFFSET: u64 = 0xc0;
const DSDT_OFFSET: u64 = 0x200;
const MADT_OFFSET: u64 = 0x280;

const RSDP_SIZE: usize = 36;
/// Bytes of the RSDP covered by its ACPI 1.0 checksum.
const RSDP_V1_SIZE: usize = 20;
const FACS_SIZE: usize = 64;
const HEADER_SIZE: usize = 36;
const FADT_SIZE: usize = 276;
/// MADT: the header, the local APIC address and the flags.
const MADT_FIXED_SIZE: usize = HEADER_SIZE + 8;
const MADT_LAPIC_SIZE: usize = 8;
const MADT_IOAPIC_SIZE: usize = 12;
const MADT_LAPIC_NMI_SIZE: usize = 6;

const OEM_ID: &[u8; 6] = b"EMBER ";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
const CREATOR_ID: &[u8; 4] = b"EMBR";

/// FADT flags: WBINVD works; the power and sleep buttons are not fixed hardware.
const FADT_WBINVD: u32 = 1;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT IA-PC boot architecture flags: an i8042, no VGA, no MSI, no CMOS clock.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// `Name (_S5_, Package (0x04) { 0x05, Zero, Zero, Zero })` in AML.
const S5_AML: [u8; 13] = [
    0x08,
    b'_',
    b'S',
    b'5',
    b'_', // NameOp, name
    0x12,
    0x07,
    0x04, // PackageOp, PkgLength, NumElements
    0x0a,
    S5_SLEEP_TYPE as u8, // BytePrefix 5
    0x00,
    0x00,
    0x00, // ZeroOp x 3
];

/// MADT flags: the PC-AT dual 8259 PICs are present (and to be masked).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT local APIC flags: enabled.
const MADT_LAPIC_ENABLED: u32 = 1;
/// MADT processor UID meaning every processor.
const MADT_ALL_PROCESSORS: u8 = 0xff;

/// Size of the MADT for `vcpus` vCPUs.
const fn madt_size(vcpus: u8) -> usize {
    // Widening cast (`usize::from` is not const).
    MADT_FIXED_SIZE + vcpus as usize * MADT_LAPIC_SIZE + MADT_IOAPIC_SIZE + MADT_LAPIC_NMI_SIZE
}

// The tables do not overlap.
const _: () = assert!(FADT_OFFSET + FADT_SIZE as u64 <= DSDT_OFFSET);
const _: () = assert!(DSDT_OFFSET + (HEADER_SIZE + S5_AML.len()) as u64 <= MADT_OFFSET);

/// Bytes the tables occupy for `vcpus` vCPUs, from the RSDP to the end of the MADT.
pub const fn tables_size(vcpus: u8) -> usize {
    // MADT_OFFSET is 0x280: the cast cannot truncate.
    MADT_OFFSET as usize + madt_size(vcpus)
}

/// Required alignment of the tables' address: the FACS at `base + 0x40` is 64-byte aligned.
pub const ALIGNMENT: u64 = 64;

/// Writes the RSDP, FACS, XSDT, FADT, DSDT and the MADT for `vcpus` vCPUs on `platform` from
/// `base` ([`tables_size`] bytes), and returns the RSDP's address, `base`: what the boot
/// protocol's `acpi_rsdp_addr` (Linux) or `rsdp_paddr` (PVH) points to.
///
/// # Errors
///
/// [`Error::VcpuCount`] when `vcpus` is 0 or above [`MAX_VCPUS`]; [`Error::Misaligned`] when
/// `base` is not [`ALIGNMENT`]-aligned; [`Error::Above4GiB`] when the tables or the APICs are not
/// below 4 GiB; [`Error::Sci`] when the SCI line does not fit the FADT; [`Error::Write`] when
/// guest memory does not hold the tables.
pub fn setup_acpi<M: GuestMemory>(
    mem: &M,
    base: GuestAddress,
    vcpus: u8,
    platform: &Platform,
) -> Result<GuestAddress> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount(vcpus));
    }
    if base.0 % ALIGNMENT != 0 {
        return Err(Error::Misaligned(base.0));
    }
    let below_4_gib = |what, addr: u64, size: u64| {
        addr.checked_add(size)
            .filter(|end| *end <= 1 << 32)
            .and_then(|_| u32::try_from(addr).ok())
            .ok_or(Error::Above4GiB { what, addr })
    };
    // A few KiB: the cast cannot truncate.
    let base32 = below_4_gib("ACPI tables", base.0, tables_size(vcpus) as u64)?;
    let ioapic = below_4_gib("I/O APIC", platform.ioapic, 0)?;
    let lapic = below_4_gib("local APIC", platform.lapic, 0)?;
    let sci = u16::try_from(platform.acpi_pm.sci).map_err(|_| Error::Sci(platform.acpi_pm.sci))?;
    let write = |bytes: &[u8], offset: u64| {
        // Cannot overflow: the tables end below 4 GiB, checked above.
        let addr = base.0 + offset;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::Write { addr, source })
    };
    write(&rsdp(base32), RSDP_OFFSET)?;
    write(&facs(), FACS_OFFSET)?;
    write(&xacpi_table(base32), XSDT_OFFSET)?;
    write(&fadt(base32, platform, sci), FADT_OFFSET)?;
    write(&dacpi_table(), DSDT_OFFSET)?;
    write(&madt(vcpus, ioapic, lapic), MADT_OFFSET)?;
    Ok(base)
}

/// A table: the standard header for `signature` and `revision`, then `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let length = HEADER_SIZE + body.len();
    let mut table = Vec::with_capacity(length);
    table.extend_from_slice(signature);
    // Every table here is a few hundred bytes: the cast cannot truncate.
    table.extend_from_slice(&(length as u32).to_le_bytes());
    table.extend_from_slice(&[revision, 0]); // checksum, filled in below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(OEM_TABLE_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    table.extend_from_slice(CREATOR_ID);
    table.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    table.extend_from_slice(body);
    table[9] = checksum(&table);
    table
}

/// Address of the table at `offset` from `base`, below 4 GiB (checked by the caller).
fn at(base: u32, offset: u64) -> u32 {
    // The offsets are below 0x300 and the tables end below 4 GiB: cannot truncate or overflow.
    base + offset as u32
}

fn rsdp(base: u32) -> Vec<u8> {
    let mut rsdp = Vec::with_capacity(RSDP_SIZE);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0 and later, with an XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&(RSDP_SIZE as u32).to_le_bytes());
    rsdp.extend_from_slice(&u64::from(at(base, XSDT_OFFSET)).to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..RSDP_V1_SIZE]);
    rsdp[32] = checksum(&rsdp);
    rsdp
}

fn facs() -> [u8; FACS_SIZE] {
    let mut facs = [0; FACS_SIZE];
    facs[..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&(FACS_SIZE as u32).to_le_bytes());
    facs[32] = 2; // version
    facs
}

fn xacpi_table(base: u32) -> Vec<u8> {
    let entries: Vec<u8> = [FADT_OFFSET, MADT_OFFSET]
        .iter()
        .flat_map(|offset| u64::from(at(base, *offset)).to_le_bytes())
        .collect();
    table(b"XSDT", 1, &entries)
}

fn fadt(base: u32, platform: &Platform, sci: u16) -> Vec<u8> {
    let mut body = [0u8; FADT_SIZE - HEADER_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        let at = offset - HEADER_SIZE;
        body[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let pm = platform.acpi_pm;
    put(36, &at(base, FACS_OFFSET).to_le_bytes()); // FIRMWARE_CTRL
    put(40, &at(base, DSDT_OFFSET).to_le_bytes()); // DSDT
    put(46, &sci.to_le_bytes()); // SCI_INT
    put(56, &u32::from(pm.pm1a_event_port).to_le_bytes()); // PM1a_EVT_BLK
    put(64, &u32::from(pm.pm1a_control_port).to_le_bytes()); // PM1a_CNT_BLK
    put(88, &[PM1_EVT_LEN, PM1_CNT_LEN]); // PM1_EVT_LEN, PM1_CNT_LEN
    let boot_arch = BOOT_ARCH_8042
        | BOOT_ARCH_VGA_NOT_PRESENT
        | BOOT_ARCH_MSI_NOT_SUPPORTED
        | BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    put(109, &boot_arch.to_le_bytes()); // IAPC_BOOT_ARCH
    put(
        112,
        &(FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes(),
    ); // Flags
    put(140, &u64::from(at(base, DSDT_OFFSET)).to_le_bytes()); // X_DSDT
    put(268, b"EMBER   "); // hypervisor vendor identity
    table(b"FACP", 6, &body)
}

fn dacpi_table() -> Vec<u8> {
    table(b"DSDT", 2, &S5_AML)
}

/// The MADT for `vcpus` vCPUs (1 to [`MAX_VCPUS`], checked by the caller), the I/O APIC at
/// `ioapic` and the local APICs at `lapic`.
fn madt(vcpus: u8, ioapic: u32, lapic: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(madt_size(vcpus) - HEADER_SIZE);
    body.extend_from_slice(&lapic.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpus {
        // Processor local APIC: type 0; ACPI processor UID and APIC id are the vCPU index.
        body.extend_from_slice(&[0, MADT_LAPIC_SIZE as u8, cpu, cpu]);
        body.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    // I/O APIC: type 1; its id follows the vCPUs' as in the MP table; GSIs from 0.
    body.extend_from_slice(&[1, MADT_IOAPIC_SIZE as u8, vcpus, 0]);
    body.extend_from_slice(&ioapic.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: type 4; every processor, conforming polarity and trigger, LINT1.
    body.extend_from_slice(&[4, MADT_LAPIC_NMI_SIZE as u8, MADT_ALL_PROCESSORS, 0, 0, 1]);
    table(b"APIC", 5, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_platform;
    use crate::test_utils::{acpi_table, read, sums_to_zero, u32_at, u64_at};
    use vm_memory::GuestMemoryMmap;

    const ACPI_START: u64 = 0xe_0000;
    const RSDP_ADDR: u64 = ACPI_START;
    const IOAPIC_START: u64 = 0xfec0_0000;
    const LAPIC_START: u64 = 0xfee0_0000;

    fn setup_acpi(mem: &GuestMemoryMmap, vcpus: u8) -> Result<GuestAddress> {
        super::setup_acpi(mem, GuestAddress(ACPI_START), vcpus, &test_platform())
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn rsdp_leads_through_the_xsdt_to_the_fadt_and_dacpi_table() {
        let mem = memory();
        let rsdp_addr = setup_acpi(&mem, 1).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(RSDP_ADDR));
        assert_eq!(RSDP_ADDR % 16, 0, "the RSDP is found on 16-byte boundaries");

        let rsdp = read(&mem, RSDP_ADDR, RSDP_SIZE);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..RSDP_V1_SIZE]));
        assert!(sums_to_zero(&rsdp));
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_SIZE);

        let xsdt = acpi_table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_SIZE + 16, "two entries");
        acpi_table(&mem, u64_at(&xsdt, HEADER_SIZE + 8), b"APIC");
        let fadt = acpi_table(&mem, u64_at(&xsdt, HEADER_SIZE), b"FACP");
        assert_eq!(fadt.len(), FADT_SIZE);
        assert_eq!(fadt[8], 6, "FADT revision");

        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(
            u64::from(u32_at(&fadt, 40)),
            dsdt_addr,
            "DSDT and X_DSDT agree"
        );
        let dsdt = acpi_table(&mem, dsdt_addr, b"DSDT");
        assert_eq!(&dsdt[HEADER_SIZE..], &S5_AML);

        let facs = read(&mem, u64::from(u32_at(&fadt, 36)), FACS_SIZE);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4) as usize, FACS_SIZE);
        assert_eq!(ACPI_START + FACS_OFFSET, u64::from(u32_at(&fadt, 36)));
        assert_eq!(u32_at(&fadt, 36) % 64, 0, "the FACS is 64-byte aligned");
    }

    #[test]
    fn fadt_puts_the_pm1a_registers_on_the_layout_ports_with_full_hardware() {
        let mem = memory();
        setup_acpi(&mem, 1).unwrap();
        let fadt = acpi_table(&mem, ACPI_START + FADT_OFFSET, b"FACP");
        assert_eq!(u32_at(&fadt, 56), 0x600);
        assert_eq!(u32_at(&fadt, 64), 0x604);
        assert_eq!((fadt[88], fadt[89]), (4, 2));
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 3, "SCI line");
        assert_eq!(
            u32_at(&fadt, 48),
            0,
            "no SMI command port: always in ACPI mode"
        );
        let flags = u32_at(&fadt, 112);
        assert_eq!(
            flags & (1 << 20),
            0,
            "not hardware-reduced: the PIC and PIT stay"
        );
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_arch & 0b10, 0, "an i8042 to probe");
        assert_ne!(boot_arch & (1 << 5), 0, "no CMOS clock");
    }

    #[test]
    fn s5_package_is_well_formed_aml_naming_the_sleep_type() {
        // NameOp "_S5_" PackageOp: the first element is a BytePrefix'd S5_SLEEP_TYPE.
        assert_eq!(&S5_AML[..6], &[0x08, b'_', b'S', b'5', b'_', 0x12]);
        assert_eq!(
            usize::from(S5_AML[6]),
            S5_AML.len() - 6,
            "PkgLength covers the rest"
        );
        assert_eq!((S5_AML[8], u16::from(S5_AML[9])), (0x0a, S5_SLEEP_TYPE));
    }

    /// The MADT's entries after its fixed part, as (type, body) pairs.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut at = MADT_FIXED_SIZE;
        while at < madt.len() {
            let len = usize::from(madt[at + 1]);
            assert!(
                len >= 2 && at + len <= madt.len(),
                "entry at {at} overruns the table"
            );
            entries.push((madt[at], madt[at + 2..at + len].to_vec()));
            at += len;
        }
        entries
    }

    #[test]
    fn madt_says_what_the_mp_table_says() {
        let mem = memory();
        setup_acpi(&mem, 3).unwrap();
        let madt = acpi_table(&mem, ACPI_START + MADT_OFFSET, b"APIC");
        assert_eq!(madt.len(), madt_size(3));
        assert_eq!(u64::from(u32_at(&madt, HEADER_SIZE)), LAPIC_START);
        assert_eq!(u32_at(&madt, HEADER_SIZE + 4), 1, "PC-AT compatible PICs");
        let entries = madt_entries(&madt);
        let lapics: Vec<_> = entries.iter().filter(|(kind, _)| *kind == 0).collect();
        assert_eq!(lapics.len(), 3);
        for (cpu, (_, body)) in lapics.iter().enumerate() {
            assert_eq!(usize::from(body[0]), cpu, "processor UID");
            assert_eq!(usize::from(body[1]), cpu, "APIC id");
            assert_eq!(u32_at(body, 2), 1, "enabled");
        }
        let ioapic = &entries.iter().find(|(kind, _)| *kind == 1).unwrap().1;
        assert_eq!(ioapic[0], 3, "I/O APIC id after the vCPUs'");
        assert_eq!(u64::from(u32_at(ioapic, 2)), IOAPIC_START);
        assert_eq!(u32_at(ioapic, 6), 0, "GSI base");
        let nmi = &entries.iter().find(|(kind, _)| *kind == 4).unwrap().1;
        assert_eq!((nmi[0], nmi[3]), (0xff, 1), "all CPUs, LINT1");
        assert!(
            !entries.iter().any(|(kind, _)| *kind == 2),
            "no interrupt source overrides: KVM routes GSIs identity"
        );
    }

    #[test]
    fn largest_madt_fits_and_vcpu_counts_out_of_range_are_errors() {
        let mem = memory();
        setup_acpi(&mem, MAX_VCPUS).unwrap();
        let madt = acpi_table(&mem, ACPI_START + MADT_OFFSET, b"APIC");
        let lapics = madt_entries(&madt).iter().filter(|(k, _)| *k == 0).count();
        assert_eq!(lapics, usize::from(MAX_VCPUS));
        assert!(matches!(setup_acpi(&mem, 0), Err(Error::VcpuCount(0))));
        assert!(matches!(
            setup_acpi(&mem, MAX_VCPUS + 1),
            Err(Error::VcpuCount(255))
        ));
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi(&mem, 1),
            Err(Error::Write {
                addr: ACPI_START,
                ..
            })
        ));
    }

    #[test]
    fn tables_describe_the_platform_they_are_given() {
        let mem = memory();
        let mut platform = test_platform();
        platform.ioapic = 0xfe00_0000;
        platform.lapic = 0xfed0_0000;
        platform.acpi_pm = crate::AcpiPm::new(0xb000, 0xb010, 9);
        let base = 0x4_0000;
        let rsdp_addr = super::setup_acpi(&mem, GuestAddress(base), 2, &platform).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(base));
        let rsdp = read(&mem, base, RSDP_SIZE);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        let xsdt = acpi_table(&mem, u64_at(&rsdp, 24), b"XSDT");
        let fadt = acpi_table(&mem, u64_at(&xsdt, HEADER_SIZE), b"FACP");
        assert_eq!(u32_at(&fadt, 56), 0xb000);
        assert_eq!(u32_at(&fadt, 64), 0xb010);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI line");
        assert_eq!(u64::from(u32_at(&fadt, 36)), base + FACS_OFFSET);
        let madt = acpi_table(&mem, u64_at(&xsdt, HEADER_SIZE + 8), b"APIC");
        assert_eq!(u32_at(&madt, HEADER_SIZE), 0xfed0_0000);
        let ioapic = &madt_entries(&madt)
            .into_iter()
            .find(|(kind, _)| *kind == 1)
            .unwrap()
            .1;
        assert_eq!(u32_at(ioapic, 2), 0xfe00_0000);
    }

    #[test]
    fn misplaced_tables_are_rejected() {
        let mem = memory();
        let platform = test_platform();
        assert!(matches!(
            super::setup_acpi(&mem, GuestAddress(ACPI_START + 16), 1, &platform),
            Err(Error::Misaligned(_))
        ));
        assert!(matches!(
            super::setup_acpi(&mem, GuestAddress((1 << 32) - 0x100), 1, &platform),
            Err(Error::Above4GiB {
                what: "ACPI tables",
                ..
            })
        ));
        let mut platform = test_platform();
        platform.acpi_pm.sci = 0x1_0000;
        assert!(matches!(
            super::setup_acpi(&mem, GuestAddress(ACPI_START), 1, &platform),
            Err(Error::Sci(0x1_0000))
        ));
    }
}
