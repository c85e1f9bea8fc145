//! ember-boot used as another VMM would: its own platform (I/O APIC, ACPI ports, SCI, MMIO gap)
//! and its own places for the boot structures, with nothing of ember's. The guest's view is read
//! back from guest memory the way a kernel finds it: from `rsi` (or `rbx`) to the zero page (or
//! start info), from there to the command line, the memory map and the RSDP, from the RSDP to the
//! FADT and MADT, and the MP table where the layout put it.

use std::io::Cursor;

use ember_boot::config::Error as ConfigError;
use ember_boot::system::Error as SystemError;
use ember_boot::test_utils::{
    acpi_table, read, sums_to_zero, tiny_bzimage, tiny_pvh_elf, u16_at, u32_at, u64_at,
};
use ember_boot::{
    AcpiPm, BootConfig, BootLayout, CpuState, InitrdRegion, LoadedKernel, Platform, build_cmdline,
    configure_system, load_initrd, load_kernel,
};
use linux_loader::bootparam::boot_params;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GAP: std::ops::Range<u64> = 0x2000_0000..0x1_0000_0000;
const IOAPIC: u64 = 0xfe00_0000;
const LAPIC: u64 = 0xfee0_0000;
const IOAPIC_PINS: u8 = 32;
const PM1A_EVT: u16 = 0xb000;
const PM1A_CNT: u16 = 0xb008;
const SCI: u32 = 9;
const VCPUS: u8 = 3;

const ZERO_PAGE: u64 = 0x5_0000;
const CMDLINE: u64 = 0x5_1000;
const GDT: u64 = 0x5_2000;
const IDT: u64 = 0x5_2100;
const PVH_INFO: u64 = 0x5_3000;
const PVH_MODLIST: u64 = 0x5_3100;
const PVH_MEMMAP: u64 = 0x5_4000;
const PAGE_TABLES: u64 = 0x6_0000;
const BOOT_STACK: u64 = 0x7_0000;
const FIRMWARE: std::ops::Range<u64> = 0xf_0000..0x10_0000;
const MPTABLE: u64 = 0xf_0000;
const ACPI: u64 = 0xf_8000;

const CMDLINE_TEXT: &str = "console=ttyS0 panic=1";
const INITRD_SIZE: usize = 0x3000;

fn platform() -> Platform {
    Platform::new(
        IOAPIC,
        LAPIC,
        IOAPIC_PINS,
        GAP,
        AcpiPm::new(PM1A_EVT, PM1A_CNT, SCI),
    )
}

fn layout() -> BootLayout {
    let mut layout = BootLayout::default();
    layout.zero_page = ZERO_PAGE;
    layout.cmdline = CMDLINE;
    layout.gdt = GDT;
    layout.idt = IDT;
    layout.pvh_start_info = PVH_INFO;
    layout.pvh_modlist = PVH_MODLIST;
    layout.pvh_memmap = PVH_MEMMAP;
    layout.page_tables = PAGE_TABLES;
    layout.boot_stack = BOOT_STACK;
    layout.mptable = Some(MPTABLE);
    layout.acpi = ACPI;
    layout.firmware = FIRMWARE;
    layout
}

fn config() -> BootConfig {
    BootConfig::new(platform(), VCPUS).with_layout(layout())
}

/// RAM up to the gap, and 16 MiB above 4 GiB.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), usize::try_from(GAP.start).unwrap()),
        (GuestAddress(GAP.end), 16 << 20),
    ])
    .unwrap()
}

struct Booted {
    mem: GuestMemoryMmap,
    kernel: LoadedKernel,
    initrd: InitrdRegion,
    cpu: CpuState,
}

fn boot(image: &[u8]) -> Booted {
    let mem = memory();
    let config = config();
    let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
    let initrd = vec![0xa5u8; INITRD_SIZE];
    let initrd = load_initrd(&mem, &mut Cursor::new(initrd), &kernel, &config).unwrap();
    let cmdline = build_cmdline(CMDLINE_TEXT, &[]).unwrap();
    let cpu = configure_system(&mem, &kernel, &cmdline, Some(initrd), &config).unwrap();
    Booted {
        mem,
        kernel,
        initrd,
        cpu,
    }
}

/// The FADT and MADT, found from the RSDP at `rsdp` through the XSDT.
fn fadt_and_madt(mem: &GuestMemoryMmap, rsdp: u64) -> (Vec<u8>, Vec<u8>) {
    let rsdp = read(mem, rsdp, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
    let xsdt = acpi_table(mem, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|at| u64_at(&xsdt, at))
        .collect();
    let find = |signature: &[u8; 4]| {
        let addr = entries
            .iter()
            .copied()
            .find(|addr| &read(mem, *addr, 4)[..] == signature)
            .unwrap_or_else(|| panic!("no {signature:?} in the XSDT"));
        acpi_table(mem, addr, signature)
    };
    (find(b"FACP"), find(b"APIC"))
}

/// The MADT's entries after its fixed part, as (type, bytes) pairs.
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        entries.push((madt[at], madt[at..at + len].to_vec()));
        at += len;
    }
    entries
}

#[test]
fn zero_page_is_where_rsi_points_and_describes_the_layout() {
    let b = boot(&tiny_bzimage(&[0xf4]));
    assert_eq!(b.cpu.regs.rsi, ZERO_PAGE);
    assert_eq!(b.cpu.regs.rip, b.kernel.entry.0);
    assert_eq!(b.cpu.regs.rsp, BOOT_STACK);
    assert_eq!(b.cpu.sregs.cr3, PAGE_TABLES);
    assert_eq!(b.cpu.sregs.gdt.base, GDT);
    assert_eq!(b.cpu.sregs.idt.base, IDT);
    // The page tables map the gap, so that the kernel can reach the APICs before its own.
    let pml4e: u64 = b.mem.read_obj(GuestAddress(PAGE_TABLES)).unwrap();
    assert_eq!(pml4e & !0xfff, PAGE_TABLES + 0x1000);

    let params: boot_params = b.mem.read_obj(GuestAddress(b.cpu.regs.rsi)).unwrap();
    assert_eq!({ params.hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!(u64::from(params.hdr.cmd_line_ptr), CMDLINE);
    let cmdline = read(&b.mem, CMDLINE, CMDLINE_TEXT.len() + 1);
    assert_eq!(cmdline, format!("{CMDLINE_TEXT}\0").as_bytes());
    assert_eq!({ params.acpi_rsdp_addr }, ACPI);
    assert_eq!(u64::from(params.hdr.ramdisk_image), b.initrd.addr.0);
    assert_eq!(params.hdr.ramdisk_size as usize, INITRD_SIZE);
}

#[test]
fn e820_reserves_the_firmware_range_and_leaves_the_mmio_gap_a_hole() {
    let b = boot(&tiny_bzimage(&[0xf4]));
    let params: boot_params = b.mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
    let table = params.e820_table;
    let map: Vec<(u64, u64, u32)> = table[..usize::from(params.e820_entries)]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(
        map,
        vec![
            (0, FIRMWARE.start, 1),
            (FIRMWARE.start, FIRMWARE.end - FIRMWARE.start, 2),
            (FIRMWARE.end, GAP.start - FIRMWARE.end, 1),
            (GAP.end, 16 << 20, 1),
        ]
    );
    assert!(
        map.iter()
            .all(|(addr, size, _)| addr + size <= GAP.start || *addr >= GAP.end),
        "nothing in the gap"
    );
}

#[test]
fn initrd_ends_below_the_mmio_gap() {
    // The bzImage allows the initrd up to 2 GiB: the gap at 512 MiB is the lower bound.
    let b = boot(&tiny_bzimage(&[0xf4]));
    assert_eq!({ b.kernel.initrd_addr_max }, 0x7fff_ffff);
    let end = b.initrd.addr.0 + INITRD_SIZE as u64;
    assert!(end <= GAP.start);
    assert_eq!(b.initrd.addr.0, GAP.start - INITRD_SIZE as u64);
    assert_eq!(read(&b.mem, b.initrd.addr.0, 4), [0xa5; 4]);
}

#[test]
fn rsdp_is_where_asked_and_the_fadt_has_the_platforms_pm_ports_and_sci() {
    let b = boot(&tiny_bzimage(&[0xf4]));
    let (fadt, _) = fadt_and_madt(&b.mem, ACPI);
    assert_eq!(u32_at(&fadt, 56), u32::from(PM1A_EVT), "PM1a_EVT_BLK");
    assert_eq!(u32_at(&fadt, 64), u32::from(PM1A_CNT), "PM1a_CNT_BLK");
    assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1 block lengths");
    assert_eq!(u32::from(u16_at(&fadt, 46)), SCI, "SCI_INT");
    // FACS and DSDT lie in the firmware range, after the RSDP.
    for offset in [36, 40] {
        assert!(FIRMWARE.contains(&u64::from(u32_at(&fadt, offset))));
    }
    let dsdt = acpi_table(&b.mem, u64_at(&fadt, 140), b"DSDT");
    assert_eq!(&dsdt[36..41], b"\x08_S5_");
}

#[test]
fn madt_has_the_platforms_apics_and_every_vcpu() {
    let b = boot(&tiny_bzimage(&[0xf4]));
    let (_, madt) = fadt_and_madt(&b.mem, ACPI);
    assert_eq!(u64::from(u32_at(&madt, 36)), LAPIC);
    let entries = madt_entries(&madt);
    let lapics = entries.iter().filter(|(kind, _)| *kind == 0).count();
    assert_eq!(lapics, usize::from(VCPUS));
    let ioapic = &entries.iter().find(|(kind, _)| *kind == 1).unwrap().1;
    assert_eq!(ioapic[2], VCPUS, "I/O APIC id after the vCPUs'");
    assert_eq!(u64::from(u32_at(ioapic, 4)), IOAPIC);
}

#[test]
fn mp_table_is_where_asked_with_the_platforms_apics_and_lines() {
    let b = boot(&tiny_bzimage(&[0xf4]));
    let fp = read(&b.mem, MPTABLE, 16);
    assert_eq!(&fp[..4], b"_MP_");
    assert!(sums_to_zero(&fp));
    let base = u64::from(u32_at(&fp, 4));
    let header = read(&b.mem, base, 44);
    assert_eq!(&header[..4], b"PCMP");
    let config = read(&b.mem, base, usize::from(u16_at(&header, 4)));
    assert!(sums_to_zero(&config));
    assert_eq!(u64::from(u32_at(&config, 36)), LAPIC);
    let (mut cpus, mut ioapics, mut lines) = (0, Vec::new(), 0);
    let mut at = 44;
    while at < config.len() {
        match config[at] {
            0 => {
                cpus += 1;
                at += 20;
                continue;
            }
            2 => ioapics.push(u64::from(u32_at(&config, at + 4))),
            3 => lines += 1,
            _ => {}
        }
        at += 8;
    }
    assert_eq!(cpus, VCPUS);
    assert_eq!(ioapics, vec![IOAPIC]);
    assert_eq!(lines, IOAPIC_PINS);
}

#[test]
fn pvh_start_info_is_where_rbx_points_and_describes_the_layout() {
    let b = boot(&tiny_pvh_elf(&[0xf4]));
    assert_eq!(b.cpu.regs.rbx, PVH_INFO);
    assert_eq!(b.cpu.sregs.gdt.base, GDT);
    let info: hvm_start_info = b.mem.read_obj(GuestAddress(b.cpu.regs.rbx)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.cmdline_paddr, CMDLINE);
    assert_eq!(info.rsdp_paddr, ACPI);
    assert_eq!(info.modlist_paddr, PVH_MODLIST);
    let module: hvm_modlist_entry = b.mem.read_obj(GuestAddress(PVH_MODLIST)).unwrap();
    assert_eq!(module.paddr, b.initrd.addr.0);
    assert_eq!(info.memmap_paddr, PVH_MEMMAP);
    assert_eq!(info.memmap_entries, 4);
    let reserved: hvm_memmap_table_entry = b.mem.read_obj(GuestAddress(PVH_MEMMAP + 24)).unwrap();
    assert_eq!(
        (reserved.addr, reserved.size, reserved.type_),
        (FIRMWARE.start, FIRMWARE.end - FIRMWARE.start, 2)
    );
    // The Linux zero page is not written for PVH.
    assert_eq!(read(&b.mem, ZERO_PAGE + 0x202, 4), [0; 4]);
}

#[test]
fn a_layout_that_does_not_hold_together_is_refused_before_anything_is_written() {
    let mem = memory();
    let kernel = load_kernel(&mem, &mut Cursor::new(tiny_bzimage(&[0xf4]))).unwrap();
    let cmdline = build_cmdline(CMDLINE_TEXT, &[]).unwrap();

    let mut overlapping = config();
    overlapping.layout.cmdline = ZERO_PAGE + 0x800;
    let err = configure_system(&mem, &kernel, &cmdline, None, &overlapping).unwrap_err();
    assert!(
        matches!(
            err,
            SystemError::Config(ConfigError::Overlap {
                first: "zero page",
                second: "command line",
                ..
            })
        ),
        "{err:?}"
    );

    let mut unreserved = config();
    unreserved.layout.acpi = 0x8_0000;
    assert!(matches!(
        unreserved.validate(),
        Err(ConfigError::OutsideFirmware {
            what: "ACPI tables",
            ..
        })
    ));

    let mut past_memory = config();
    past_memory.platform.mmio_gap = 0xf000_0000..0x1_0000_0000;
    past_memory.layout.zero_page = 0x3000_0000;
    let err = configure_system(&mem, &kernel, &cmdline, None, &past_memory).unwrap_err();
    assert!(
        matches!(
            err,
            SystemError::Config(ConfigError::NotInMemory {
                what: "zero page",
                addr: 0x3000_0000,
                ..
            })
        ),
        "{err:?}"
    );

    let mut small_gap = config();
    small_gap.platform.mmio_gap = 0x100_0000..0x1_0000_0000;
    let ram_in_gap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let err = configure_system(&ram_in_gap, &kernel, &cmdline, None, &small_gap).unwrap_err();
    assert!(matches!(err, SystemError::MemoryMap(_)), "{err:?}");

    let mut apic_in_ram = config();
    apic_in_ram.platform.ioapic = 0x1000_0000;
    assert!(matches!(
        apic_in_ram.validate(),
        Err(ConfigError::ApicOutsideGap { .. })
    ));

    assert_eq!(read(&mem, ZERO_PAGE, 0x300), vec![0; 0x300]);
    assert_eq!(read(&mem, ACPI, 8), vec![0; 8]);
}
