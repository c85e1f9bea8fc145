//! The ACPI tables through which a Linux guest powers itself off.
//!
//! Without a power-off method, Linux turns `poweroff` into a halt and the guest stops forever
//! without the VMM noticing. These tables give it the ACPI one: Linux finds the RSDP, follows
//! the XSDT to the FADT, which places the PM1a event and control registers on the I/O ports of
//! [`ember_memory::layout`], and evaluates the DSDT's `\_S5_` object for the soft-off sleep type
//! [`S5_SLEEP_TYPE`]. Powering off is then a write of that sleep type with "sleep enable" to the
//! PM1a control register, which the VMM's PM device turns into a clean stop.
//!
//! Only power management goes through ACPI: there is no MADT, so the kernel keeps taking its CPUs
//! and interrupt routing from the MP table, and the FADT says there is no VGA, no CMOS clock, no
//! MSI and no i8042 to probe.
//!
//! ```text
//! ACPI_START + 0x000  RSDP (revision 2)  -> XSDT
//! ACPI_START + 0x040  FACS
//! ACPI_START + 0x080  XSDT               -> FADT
//! ACPI_START + 0x0c0  FADT (revision 6)  -> FACS, DSDT, PM1a event/control ports, SCI
//! ACPI_START + 0x200  DSDT               Name (_S5_, Package () { 5, 0, 0, 0 })
//! ```

use ember_memory::layout::{ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_PORT, ACPI_SCI_IRQ};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{ACPI_START, HIMEM_START};
use crate::mptable::checksum;

/// Errors of ACPI table setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables could not be written to guest memory.
    #[error("Cannot write the ACPI tables to guest memory at {ACPI_START:#x}")]
    Write(#[source] GuestMemoryError),
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

const RSDP_SIZE: usize = 36;
/// Bytes of the RSDP covered by its ACPI 1.0 checksum.
const RSDP_V1_SIZE: usize = 20;
const FACS_SIZE: usize = 64;
const HEADER_SIZE: usize = 36;
const FADT_SIZE: usize = 276;

const OEM_ID: &[u8; 6] = b"EMBER ";
const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
const CREATOR_ID: &[u8; 4] = b"EMBR";

/// FADT flags: WBINVD works; the power and sleep buttons are not fixed hardware.
const FADT_WBINVD: u32 = 1;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT IA-PC boot architecture flags: no VGA, no MSI, no CMOS clock. Bit 1 (an i8042 is
/// present) stays clear: ember's i8042 only has the reset line, not worth a driver's probe.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Lengths of the PM1 event block (status and enable) and control block.
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;

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

// Every table stays inside the BIOS area below 1 MiB.
const _: () =
    assert!(ACPI_START + DSDT_OFFSET + (HEADER_SIZE + S5_AML.len()) as u64 <= HIMEM_START);
const _: () = assert!(FADT_OFFSET + FADT_SIZE as u64 <= DSDT_OFFSET);

/// Address of the RSDP: what the boot protocol's `acpi_rsdp_addr` (Linux) or `rsdp_paddr` (PVH)
/// points to.
pub const RSDP_ADDR: u64 = ACPI_START + RSDP_OFFSET;

/// Writes the RSDP, FACS, XSDT, FADT and DSDT at [`ACPI_START`] and returns the RSDP's address.
///
/// # Errors
///
/// [`Error::Write`] when guest memory does not hold the BIOS area below 1 MiB.
pub fn setup_acpi<M: GuestMemory>(mem: &M) -> Result<GuestAddress> {
    let write = |bytes: &[u8], offset: u64| {
        mem.write_slice(bytes, GuestAddress(ACPI_START + offset))
            .map_err(Error::Write)
    };
    write(&rsdp(), RSDP_OFFSET)?;
    write(&facs(), FACS_OFFSET)?;
    write(&xsdt(), XSDT_OFFSET)?;
    write(&fadt(), FADT_OFFSET)?;
    write(&dsdt(), DSDT_OFFSET)?;
    Ok(GuestAddress(RSDP_ADDR))
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

fn rsdp() -> Vec<u8> {
    let mut rsdp = Vec::with_capacity(RSDP_SIZE);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0 and later, with an XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&(RSDP_SIZE as u32).to_le_bytes());
    rsdp.extend_from_slice(&(ACPI_START + XSDT_OFFSET).to_le_bytes());
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

fn xsdt() -> Vec<u8> {
    table(b"XSDT", 1, &(ACPI_START + FADT_OFFSET).to_le_bytes())
}

fn fadt() -> Vec<u8> {
    let mut body = [0u8; FADT_SIZE - HEADER_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        let at = offset - HEADER_SIZE;
        body[at..at + bytes.len()].copy_from_slice(bytes);
    };
    // The tables and ports are below 4 GiB and the SCI line below 24: the casts cannot truncate.
    put(36, &((ACPI_START + FACS_OFFSET) as u32).to_le_bytes()); // FIRMWARE_CTRL
    put(40, &((ACPI_START + DSDT_OFFSET) as u32).to_le_bytes()); // DSDT
    put(46, &(ACPI_SCI_IRQ as u16).to_le_bytes()); // SCI_INT
    put(56, &(ACPI_PM1_EVT_PORT as u32).to_le_bytes()); // PM1a_EVT_BLK
    put(64, &(ACPI_PM1_CNT_PORT as u32).to_le_bytes()); // PM1a_CNT_BLK
    put(88, &[PM1_EVT_LEN, PM1_CNT_LEN]); // PM1_EVT_LEN, PM1_CNT_LEN
    let boot_arch =
        BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED | BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    put(109, &boot_arch.to_le_bytes()); // IAPC_BOOT_ARCH
    put(
        112,
        &(FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes(),
    ); // Flags
    put(140, &(ACPI_START + DSDT_OFFSET).to_le_bytes()); // X_DSDT
    put(268, b"EMBER   "); // hypervisor vendor identity
    table(b"FACP", 6, &body)
}

fn dsdt() -> Vec<u8> {
    table(b"DSDT", 2, &S5_AML)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    /// Reads the table at `addr`, checks its header and checksum, returns it whole.
    fn sdt(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, HEADER_SIZE);
        assert_eq!(&header[..4], signature);
        let table = read(mem, addr, u32_at(&header, 4) as usize);
        assert!(sums_to_zero(&table), "{signature:?} checksum");
        table
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn rsdp_leads_through_the_xsdt_to_the_fadt_and_dsdt() {
        let mem = memory();
        let rsdp_addr = setup_acpi(&mem).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(RSDP_ADDR));
        assert_eq!(RSDP_ADDR % 16, 0, "the RSDP is found on 16-byte boundaries");

        let rsdp = read(&mem, RSDP_ADDR, RSDP_SIZE);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..RSDP_V1_SIZE]));
        assert!(sums_to_zero(&rsdp));
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_SIZE);

        let xsdt = sdt(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_SIZE + 8, "one entry");
        let fadt = sdt(&mem, u64_at(&xsdt, HEADER_SIZE), b"FACP");
        assert_eq!(fadt.len(), FADT_SIZE);
        assert_eq!(fadt[8], 6, "FADT revision");

        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(
            u64::from(u32_at(&fadt, 40)),
            dsdt_addr,
            "DSDT and X_DSDT agree"
        );
        let dsdt = sdt(&mem, dsdt_addr, b"DSDT");
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
        setup_acpi(&mem).unwrap();
        let fadt = sdt(&mem, ACPI_START + FADT_OFFSET, b"FACP");
        assert_eq!(u64::from(u32_at(&fadt, 56)), ACPI_PM1_EVT_PORT);
        assert_eq!(u64::from(u32_at(&fadt, 64)), ACPI_PM1_CNT_PORT);
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
        assert_eq!(boot_arch & 0b10, 0, "no i8042 to probe");
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

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(setup_acpi(&mem), Err(Error::Write(_))));
    }
}
