//! Everything between a loaded kernel and the boot vCPU's first instruction.
//!
//! [`configure_system`] checks the [`BootConfig`], writes the command line, the memory map, the MP
//! table and the ACPI tables, then the structures of the kernel's boot protocol, all where the
//! configuration's [`BootLayout`] says, and returns the [`CpuState`] that
//! enters the kernel:
//!
//! - Linux 64-bit boot protocol (ELF without PVH, bzImage): the zero page (`boot_params`) with the
//!   e820 map, a GDT with a 64-bit code segment, identity page tables, and the vCPU in long mode
//!   at the kernel's 64-bit entry with `rsi` pointing to the zero page.
//! - PVH boot protocol (ELF with the PVH note): `hvm_start_info` with the memory map and the
//!   initrd as a module, a GDT with flat 32-bit segments, and the vCPU in 32-bit protected mode
//!   without paging at the PVH entry with `rbx` pointing to the start info.

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error as ConfiguratorError};
use linux_loader::loader::Cmdline;
use linux_loader::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::cmdline::{self, load_cmdline};
use crate::config::{self, BootConfig, BootLayout};
use crate::cpu::{
    CpuState, EFER_LMA, EFER_LME, RFLAGS_RESERVED, Registers, Segment, SpecialRegisters,
    X86_CR0_ET, X86_CR0_PE, X86_CR0_PG, X86_CR4_PAE,
};
use crate::e820::{self, MemoryMapEntry};
use crate::gdt::{self, CODE_INDEX, DATA_INDEX, GDT_ENTRIES, TSS_INDEX, segment_from_gdt};
use crate::initrd::InitrdRegion;
use crate::kernel::{KernelFormat, LoadedKernel};
use crate::{acpi, mptable, paging};

/// Errors of boot-time system configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The boot configuration is not valid, or does not fit guest memory, the kernel and the
    /// initrd.
    #[error("The boot configuration cannot be used")]
    Config(#[source] config::Error),
    /// The memory map could not be built.
    #[error("Cannot build the guest memory map")]
    MemoryMap(#[source] e820::Error),
    /// The command line could not be written.
    #[error("Cannot load the kernel command line")]
    Cmdline(#[source] cmdline::Error),
    /// The MP table could not be written.
    #[error("Cannot set up the MP table")]
    MpTable(#[source] mptable::Error),
    /// The ACPI tables could not be written.
    #[error("Cannot set up the ACPI tables")]
    Acpi(#[source] acpi::Error),
    /// The GDT or IDT could not be written.
    #[error("Cannot set up the boot descriptor tables")]
    DescriptorTables(#[source] gdt::Error),
    /// The identity page tables could not be written.
    #[error("Cannot set up the boot page tables")]
    Paging(#[source] paging::Error),
    /// The kernel is to be booted with PVH but has no PVH entry point.
    #[error("The kernel is set to boot with PVH but has no PVH entry point")]
    NoPvhEntry,
    /// The initrd is not in guest memory, or not where the zero page can point (below 4 GiB).
    #[error(
        "The initrd of {size} bytes at {addr:#x} is outside guest memory or beyond the boot \
         protocol's reach"
    )]
    InitrdOutOfReach {
        /// Address of the initrd.
        addr: u64,
        /// Size of the initrd.
        size: usize,
    },
    /// The zero page could not be written.
    #[error("Cannot write the zero page to guest memory at {addr:#x}")]
    ZeroPage {
        /// Where the zero page goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: ConfiguratorError,
    },
    /// The PVH start info could not be written.
    #[error("Cannot write the PVH start info to guest memory at {addr:#x}")]
    StartInfo {
        /// Where the start info goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: ConfiguratorError,
    },
}

/// Result type of boot-time system configuration.
pub type Result<T> = std::result::Result<T, Error>;

/// Marks the loader as "other / undefined" in the setup header.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Setup header boot flag.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Setup header magic, "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Kernel alignment reported when the kernel does not give one (16 MiB).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// The LDT register as a vCPU comes out of reset: present, empty, type LDT.
const LDT_AT_RESET: Segment = Segment {
    base: 0,
    limit: 0xffff,
    selector: 0,
    type_: 2,
    present: true,
    dpl: 0,
    db: false,
    s: false,
    l: false,
    granularity: false,
    avl: false,
    unusable: false,
};

/// Writes everything the kernel's boot protocol needs besides the kernel and the initrd, and
/// returns the state the boot vCPU starts in.
///
/// Checks `config` ([`BootConfig::validate`]) and its placement in `mem` clear of the kernel and
/// the initrd ([`BootConfig::check_placement`]), then writes the command line, the MP table for
/// the configuration's vCPUs, the ACPI tables (pointed to by the boot protocol's RSDP address),
/// and then the zero page, GDT, IDT and page tables (Linux 64-bit boot), or the start info, GDT
/// and IDT (PVH boot, chosen when `kernel.format` is [`KernelFormat::ElfPvh`]), each where the
/// configuration's layout says.
///
/// # Errors
///
/// Any [`Error`]: chiefly [`Error::Config`] for a configuration that is not valid or does not fit
/// guest memory, guest memory without its first MiB, or an initrd out of the protocol's reach.
pub fn configure_system<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    config: &BootConfig,
) -> Result<CpuState> {
    let regions = config.checked_regions().map_err(Error::Config)?;
    let layout = &config.layout;
    let memory_map = e820::memory_map(mem, &layout.firmware, &config.platform.mmio_gap)
        .map_err(Error::MemoryMap)?;
    if let Some(initrd) = initrd {
        if !GuestMemoryBackend::check_range(mem, initrd.addr, initrd.size) {
            return Err(initrd_out_of_reach(initrd));
        }
    }
    config::check_placement(&regions, mem, kernel, initrd).map_err(Error::Config)?;
    let cmdline_size =
        load_cmdline(mem, cmdline, GuestAddress(layout.cmdline)).map_err(Error::Cmdline)?;
    if let Some(mptable) = layout.mptable {
        mptable::setup_mptable(mem, GuestAddress(mptable), config.vcpus, &config.platform)
            .map_err(Error::MpTable)?;
    }
    let rsdp = acpi::setup_acpi(
        mem,
        GuestAddress(layout.acpi),
        config.vcpus,
        &config.platform,
    )
    .map_err(Error::Acpi)?;

    match kernel.format {
        KernelFormat::ElfPvh => {
            let entry = kernel.pvh_entry.ok_or(Error::NoPvhEntry)?;
            write_start_info(mem, layout, &memory_map, initrd, rsdp)?;
            enter_protected_mode(mem, layout, entry)
        }
        KernelFormat::Elf | KernelFormat::BzImage => {
            let zero_page = ZeroPage {
                kernel,
                cmdline_size,
                memory_map: &memory_map,
                initrd,
                rsdp,
            };
            write_zero_page(mem, layout, &zero_page)?;
            enter_long_mode(mem, layout, kernel.entry)
        }
    }
}

/// What the zero page describes.
struct ZeroPage<'a> {
    kernel: &'a LoadedKernel,
    cmdline_size: usize,
    memory_map: &'a [MemoryMapEntry],
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
}

fn initrd_out_of_reach(initrd: InitrdRegion) -> Error {
    Error::InitrdOutOfReach {
        addr: initrd.addr.0,
        size: initrd.size,
    }
}

/// Writes the Linux zero page.
fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    layout: &BootLayout,
    zero_page: &ZeroPage<'_>,
) -> Result<()> {
    let ZeroPage {
        kernel,
        cmdline_size,
        memory_map,
        initrd,
        rsdp,
    } = *zero_page;
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.0,
        ..Default::default()
    };
    if let (KernelFormat::BzImage, Some(hdr)) = (kernel.format, kernel.setup_header) {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    // The validated layout puts the command line below the MMIO gap, itself below 4 GiB, and
    // it is at most 2048 bytes: the casts cannot truncate.
    params.hdr.cmd_line_ptr = layout.cmdline as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        // The header's fields are 32-bit: the initrd must lie below 4 GiB.
        let end = u64::try_from(initrd.size)
            .ok()
            .and_then(|size| initrd.addr.0.checked_add(size));
        if end.is_none_or(|end| end > 1 << 32) {
            return Err(initrd_out_of_reach(initrd));
        }
        params.hdr.ramdisk_image =
            u32::try_from(initrd.addr.0).map_err(|_| initrd_out_of_reach(initrd))?;
        params.hdr.ramdisk_size =
            u32::try_from(initrd.size).map_err(|_| initrd_out_of_reach(initrd))?;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.e820_type(),
        };
    }
    // At most e820::MAX_ENTRIES (128): fits in u8.
    params.e820_entries = memory_map.len() as u8;

    let boot_params = BootParams::new(&params, GuestAddress(layout.zero_page));
    LinuxBootConfigurator::write_bootparams(&boot_params, mem).map_err(|source| Error::ZeroPage {
        addr: layout.zero_page,
        source,
    })
}

/// Writes the PVH start info, its memory map and module list.
fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    layout: &BootLayout,
    memory_map: &[MemoryMapEntry],
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|entry| hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind.pvh_type(),
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout.cmdline,
        rsdp_paddr: rsdp.0,
        memmap_paddr: layout.pvh_memmap,
        // At most e820::MAX_ENTRIES (128): fits in u32.
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = initrd.map(|initrd| hvm_modlist_entry {
        paddr: initrd.addr.0,
        // usize is at most 64 bits.
        size: initrd.size as u64,
        ..Default::default()
    });
    if module.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout.pvh_modlist;
    }
    let mut boot_params = BootParams::new(&start_info, GuestAddress(layout.pvh_start_info));
    boot_params.set_sections(&memmap, GuestAddress(layout.pvh_memmap));
    if let Some(module) = module {
        boot_params.set_modules(&[module], GuestAddress(layout.pvh_modlist));
    }
    PvhBootConfigurator::write_bootparams(&boot_params, mem).map_err(|source| Error::StartInfo {
        addr: layout.pvh_start_info,
        source,
    })
}

/// Segment registers loaded from `gdt`, written to guest memory with an empty IDT.
fn load_segments<M: GuestMemoryBackend>(
    mem: &M,
    layout: &BootLayout,
    gdt: &[u64; GDT_ENTRIES],
) -> Result<SpecialRegisters> {
    let (gdtr, idtr) =
        gdt::write_descriptor_tables(mem, gdt, GuestAddress(layout.gdt), GuestAddress(layout.idt))
            .map_err(Error::DescriptorTables)?;
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    Ok(SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt: LDT_AT_RESET,
        gdt: gdtr,
        idt: idtr,
        ..Default::default()
    })
}

/// Long mode with the identity page tables, at `entry` with `rsi` pointing to the zero page.
fn enter_long_mode<M: GuestMemoryBackend>(
    mem: &M,
    layout: &BootLayout,
    entry: GuestAddress,
) -> Result<CpuState> {
    let mut sregs = load_segments(mem, layout, &gdt::long_mode_gdt())?;
    sregs.cr3 = paging::setup_identity_paging(mem, GuestAddress(layout.page_tables))
        .map_err(Error::Paging)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    let regs = Registers {
        rip: entry.0,
        rsp: layout.boot_stack,
        rbp: layout.boot_stack,
        rsi: layout.zero_page,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    Ok(CpuState { regs, sregs })
}

/// 32-bit protected mode without paging, at `entry` with `rbx` pointing to the start info.
fn enter_protected_mode<M: GuestMemoryBackend>(
    mem: &M,
    layout: &BootLayout,
    entry: GuestAddress,
) -> Result<CpuState> {
    let mut sregs = load_segments(mem, layout, &gdt::protected_mode_gdt())?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    let regs = Registers {
        rip: entry.0,
        rbx: layout.pvh_start_info,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    Ok(CpuState { regs, sregs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::build_cmdline;
    use crate::config::test_platform;
    use crate::e820::MemoryKind;
    use crate::initrd::load_initrd;
    use crate::kernel::load_kernel;
    use crate::layout::{
        ACPI_START, BOOT_STACK_POINTER, CMDLINE_START, EBDA_START, GDT_START, HIMEM_START,
        MPTABLE_START, PAGE_TABLES_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
        ZERO_PAGE_START,
    };
    use crate::test_utils::{TINY_LOAD_ADDR, tiny_bzimage, tiny_elf, tiny_pvh_elf};
    use std::io::Cursor;
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MEM_SIZE: usize = 64 << 20;
    const CMDLINE: &str = "console=ttyS0 reboot=k";

    fn config(vcpus: u8) -> BootConfig {
        BootConfig::new(test_platform(), vcpus)
    }

    struct Booted {
        mem: GuestMemoryMmap,
        kernel: LoadedKernel,
        initrd: Option<InitrdRegion>,
        cpu: CpuState,
    }

    fn boot(image: &[u8], initrd_size: Option<usize>, vcpus: u8) -> Booted {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
        let initrd = initrd_size.map(|size| {
            load_initrd(&mem, &mut Cursor::new(vec![7u8; size]), &kernel, &config(1)).unwrap()
        });
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let cpu = configure_system(&mem, &kernel, &cmdline, initrd, &config(vcpus)).unwrap();
        Booted {
            mem,
            kernel,
            initrd,
            cpu,
        }
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn expected_map() -> Vec<(u64, u64, MemoryKind)> {
        vec![
            (0, EBDA_START, MemoryKind::Ram),
            (EBDA_START, HIMEM_START - EBDA_START, MemoryKind::Reserved),
            (HIMEM_START, MEM_SIZE as u64 - HIMEM_START, MemoryKind::Ram),
        ]
    }

    /// Reads the descriptor the selector points to from the GDT in guest memory.
    fn descriptor(mem: &GuestMemoryMmap, cpu: &CpuState, selector: u16) -> u64 {
        assert!(u64::from(selector) + 7 <= u64::from(cpu.sregs.gdt.limit));
        mem.read_obj(GuestAddress(cpu.sregs.gdt.base + u64::from(selector)))
            .unwrap()
    }

    #[test]
    fn zero_page_describes_the_boot_for_an_elf_kernel() {
        let b = boot(&tiny_elf(&[0xf4]), Some(0x2345), 1);
        let params = zero_page(&b.mem);
        let initrd = b.initrd.unwrap();
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!(u64::from(params.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!(
            usize::try_from(params.hdr.cmdline_size).unwrap(),
            CMDLINE.len() + 1
        );
        assert_eq!({ params.hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!(u64::from(params.hdr.ramdisk_image), initrd.addr.0);
        assert_eq!({ params.hdr.ramdisk_size }, 0x2345);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        let mut cmdline = vec![0u8; CMDLINE.len() + 1];
        b.mem
            .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(cmdline, format!("{CMDLINE}\0").as_bytes());
    }

    #[test]
    fn zero_page_carries_the_e820_map() {
        let b = boot(&tiny_elf(&[0xf4]), None, 1);
        let params = zero_page(&b.mem);
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        let entries: Vec<_> = table[..3]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        let expected: Vec<_> = expected_map()
            .into_iter()
            .map(|(a, s, k)| (a, s, k.e820_type()))
            .collect();
        assert_eq!(entries, expected);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn zero_page_keeps_the_bzimage_setup_header() {
        let b = boot(&tiny_bzimage(&[0xf4]), Some(0x1000), 1);
        let params = zero_page(&b.mem);
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.setup_sects }, 1);
        assert_eq!({ params.hdr.code32_start }, HIMEM_START as u32);
        assert_eq!({ params.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ params.hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!(u64::from(params.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1000);
        assert_eq!(b.cpu.regs.rip, HIMEM_START + 0x200);
    }

    #[test]
    fn long_mode_entry_registers() {
        let b = boot(&tiny_elf(&[0xf4]), None, 1);
        let regs = b.cpu.regs;
        assert_eq!(regs.rip, b.kernel.entry.0);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 2);
        let sregs = b.cpu.sregs;
        assert_eq!(sregs.cr0, 0x8000_0011);
        assert_eq!(sregs.cr3, PAGE_TABLES_START);
        assert_eq!(sregs.cr4, 0x20);
        assert_eq!(sregs.efer, 0x500);
        // The page tables are in place: PML4[0] points to a present PDPT.
        let pml4e: u64 = b.mem.read_obj(GuestAddress(sregs.cr3)).unwrap();
        assert_eq!(pml4e & 1, 1);
    }

    #[test]
    fn segment_registers_match_the_gdt_in_memory() {
        for image in [tiny_elf(&[0xf4]), tiny_pvh_elf(&[0xf4])] {
            let b = boot(&image, None, 1);
            let sregs = b.cpu.sregs;
            assert_eq!(sregs.gdt.base, GDT_START);
            for seg in [
                sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr,
            ] {
                let entry = descriptor(&b.mem, &b.cpu, seg.selector);
                assert_eq!(gdt::segment_from_gdt(entry, (seg.selector >> 3) as u8), seg);
            }
            assert_eq!(sregs.cs.selector, 0x8);
            assert_eq!(sregs.ss.selector, 0x10);
            assert_eq!(sregs.tr.selector, 0x18);
            assert!(!sregs.ldt.unusable && sregs.ldt.type_ == 2);
        }
    }

    #[test]
    fn long_mode_code_segment_is_64_bit() {
        let b = boot(&tiny_elf(&[0xf4]), None, 1);
        let cs = b.cpu.sregs.cs;
        assert!(cs.l && !cs.db && cs.present);
        let entry = descriptor(&b.mem, &b.cpu, cs.selector);
        assert_eq!((entry >> 40) & 0xf0ff, 0xa09b);
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode() {
        let b = boot(&tiny_pvh_elf(&[0xf4]), None, 1);
        let cpu = b.cpu;
        assert_eq!(cpu.regs.rip, TINY_LOAD_ADDR);
        assert_eq!(cpu.regs.rbx, PVH_INFO_START);
        assert_eq!(cpu.regs.rflags, 2);
        assert_eq!(cpu.sregs.cr0, 0x11);
        assert_eq!(cpu.sregs.cr3, 0);
        assert_eq!(cpu.sregs.cr4, 0);
        assert_eq!(cpu.sregs.efer, 0);
        let cs = cpu.sregs.cs;
        assert!(cs.db && !cs.l && cs.granularity);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
        let ds = cpu.sregs.ds;
        assert_eq!((ds.base, ds.limit, ds.type_), (0, 0xffff_ffff, 3));
    }

    #[test]
    fn pvh_start_info_describes_the_boot() {
        let b = boot(&tiny_pvh_elf(&[0xf4]), Some(0x3000), 1);
        let info: hvm_start_info = b.mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        let module: hvm_modlist_entry = b.mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        let initrd = b.initrd.unwrap();
        assert_eq!((module.paddr, module.size), (initrd.addr.0, 0x3000));

        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries, 3);
        let entries: Vec<_> = (0..3)
            .map(|i| {
                let addr = GuestAddress(info.memmap_paddr + i * 24);
                let e: hvm_memmap_table_entry = b.mem.read_obj(addr).unwrap();
                (e.addr, e.size, e.type_)
            })
            .collect();
        let expected: Vec<_> = expected_map()
            .into_iter()
            .map(|(a, s, k)| (a, s, k.pvh_type()))
            .collect();
        assert_eq!(entries, expected);
        // The Linux zero page is not written for PVH.
        assert_eq!({ zero_page(&b.mem).hdr.header }, 0);
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let b = boot(&tiny_pvh_elf(&[0xf4]), None, 1);
        let info: hvm_start_info = b.mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn pvh_capable_kernel_can_boot_in_long_mode() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_pvh_elf(&[0xf4])))
            .unwrap()
            .without_pvh();
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let cpu = configure_system(&mem, &kernel, &cmdline, None, &config(1)).unwrap();
        assert!(cpu.sregs.cs.l);
        assert_eq!(cpu.regs.rsi, ZERO_PAGE_START);
        assert_eq!({ zero_page(&mem).hdr.header }, 0x5372_6448);
    }

    #[test]
    fn mp_table_lists_every_vcpu() {
        let b = boot(&tiny_elf(&[0xf4]), None, 4);
        let mut signature = [0u8; 4];
        b.mem
            .read_slice(&mut signature, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&signature, b"_MP_");
        let mut header = [0u8; 44];
        b.mem
            .read_slice(&mut header, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        let processors = (0..4u64)
            .map(|i| {
                let addr = GuestAddress(MPTABLE_START + 16 + 44 + i * 20);
                b.mem.read_obj::<u8>(addr).unwrap()
            })
            .filter(|kind| *kind == 0)
            .count();
        assert_eq!(&header[..4], b"PCMP");
        assert_eq!(processors, 4);
    }

    #[test]
    fn bad_vcpu_counts_are_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        for vcpus in [0, 255] {
            let err = configure_system(&mem, &kernel, &cmdline, None, &config(vcpus)).unwrap_err();
            assert!(
                matches!(err, Error::Config(config::Error::VcpuCount(v)) if v == vcpus),
                "{vcpus}: {err:?}"
            );
        }
        assert!(configure_system(&mem, &kernel, &cmdline, None, &config(254)).is_ok());
    }

    #[test]
    fn pvh_format_without_pvh_entry_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        kernel.format = KernelFormat::ElfPvh;
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let err = configure_system(&mem, &kernel, &cmdline, None, &config(1)).unwrap_err();
        assert!(matches!(err, Error::NoPvhEntry));
    }

    #[test]
    fn initrd_outside_memory_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        for (addr, size) in [
            (MEM_SIZE as u64 - 0x1000, 0x2000),
            (1 << 32, 0x1000),
            (u64::MAX - 0x10, 0x1000),
            (0, usize::MAX),
        ] {
            let initrd = InitrdRegion {
                addr: GuestAddress(addr),
                size,
            };
            let err =
                configure_system(&mem, &kernel, &cmdline, Some(initrd), &config(1)).unwrap_err();
            assert!(
                matches!(err, Error::InitrdOutOfReach { .. }),
                "{addr:#x}: {err:?}"
            );
        }
    }

    #[test]
    fn initrd_above_4_gib_is_beyond_the_zero_page_but_not_pvh() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), MEM_SIZE),
            (GuestAddress(1 << 32), 0x10_0000),
        ])
        .unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(1 << 32),
            size: 0x1000,
        };
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let elf = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        let err = configure_system(&mem, &elf, &cmdline, Some(initrd), &config(1)).unwrap_err();
        assert!(matches!(
            err,
            Error::InitrdOutOfReach {
                addr: 0x1_0000_0000,
                size: 0x1000
            }
        ));
        let pvh = load_kernel(&mem, &mut Cursor::new(tiny_pvh_elf(&[0xf4]))).unwrap();
        configure_system(&mem, &pvh, &cmdline, Some(initrd), &config(1)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.paddr, 1 << 32);
        // RAM above 4 GiB is in the map.
        assert_eq!(info.memmap_entries, 4);
    }

    #[test]
    fn memory_without_low_ram_is_rejected() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x10_0000),
            pvh_entry: None,
            end: GuestAddress(0x10_1000),
            setup_header: None,
            initrd_addr_max: 0,
        };
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let err = configure_system(&mem, &kernel, &cmdline, None, &config(1)).unwrap_err();
        assert!(matches!(err, Error::MemoryMap(e820::Error::NoLowMemory)));
    }

    /// FNV-1a, enough to tell whether bytes changed.
    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn default_layout_on_embers_platform_writes_what_it_always_wrote() {
        // (format, vCPUs, initrd address, hash of the first MiB, hash of the vCPU state), as
        // written before the layout and platform became parameters: RAM up to 64 MiB, then RAM
        // up to the MMIO gap and 16 MiB above 4 GiB.
        #[rustfmt::skip]
        let golden: [(&str, u8, u64, u64, u64); 18] = [
            ("elf", 1, 0x3ffe000, 0xe6e615390a23385, 0xb7f03de2996d9893),
            ("elf", 2, 0x3ffe000, 0xac315f0eddefd57b, 0xb7f03de2996d9893),
            ("elf", 254, 0x3ffe000, 0x78d19e0eefc19121, 0xb7f03de2996d9893),
            ("pvh", 1, 0x3ffe000, 0xc2cab723b737dba0, 0x014467b76b31d167),
            ("pvh", 2, 0x3ffe000, 0xdea376a1e4e623f2, 0x014467b76b31d167),
            ("pvh", 254, 0x3ffe000, 0x9eb037910ea28334, 0x014467b76b31d167),
            ("bz", 1, 0x3ffe000, 0xb9827b5a9b8c6c15, 0x0b59c3fb46797d22),
            ("bz", 2, 0x3ffe000, 0x790c0bbc336705cb, 0x0b59c3fb46797d22),
            ("bz", 254, 0x3ffe000, 0x3844302166220211, 0x0b59c3fb46797d22),
            ("elf", 1, 0x37ffe000, 0x4cae17437934d3f9, 0xb7f03de2996d9893),
            ("elf", 2, 0x37ffe000, 0x60b8eb5dd79402f, 0xb7f03de2996d9893),
            ("elf", 254, 0x37ffe000, 0x8a73a0de8cbf3415, 0xb7f03de2996d9893),
            ("pvh", 1, 0x37ffe000, 0x47f60bbf03dd8370, 0x014467b76b31d167),
            ("pvh", 2, 0x37ffe000, 0x54a385f65de80c42, 0x014467b76b31d167),
            ("pvh", 254, 0x37ffe000, 0xc3ba3e900a4a9f64, 0x014467b76b31d167),
            ("bz", 1, 0x7fffe000, 0x4d5d2020728b5581, 0x0b59c3fb46797d22),
            ("bz", 2, 0x7fffe000, 0xb3c0ec0d27de31e7, 0x0b59c3fb46797d22),
            ("bz", 254, 0x7fffe000, 0x54f51b3c6a6366cd, 0x0b59c3fb46797d22),
        ];
        let small: &[(GuestAddress, usize)] = &[(GuestAddress(0), MEM_SIZE)];
        let large: &[(GuestAddress, usize)] = &[
            (GuestAddress(0), 0xd000_0000),
            (GuestAddress(1 << 32), 16 << 20),
        ];
        for (i, (format, vcpus, initrd_addr, low_hash, cpu_hash)) in golden.into_iter().enumerate()
        {
            let ranges = if i < 9 { small } else { large };
            let image = match format {
                "elf" => tiny_elf(&[0xf4]),
                "pvh" => tiny_pvh_elf(&[0xf4]),
                _ => tiny_bzimage(&[0xf4]),
            };
            let config = config(vcpus);
            let mem = GuestMemoryMmap::<()>::from_ranges(ranges).unwrap();
            let kernel = load_kernel(&mem, &mut Cursor::new(&image)).unwrap();
            let initrd =
                load_initrd(&mem, &mut Cursor::new(vec![0x55u8; 5000]), &kernel, &config).unwrap();
            let cmdline = build_cmdline("console=ttyS0 reboot=k panic=1", &[]).unwrap();
            let cpu = configure_system(&mem, &kernel, &cmdline, Some(initrd), &config).unwrap();
            let mut low = vec![0u8; 1 << 20];
            mem.read_slice(&mut low, GuestAddress(0)).unwrap();
            let case = format!("{format} with {vcpus} vCPUs, case {i}");
            assert_eq!(initrd.addr.0, initrd_addr, "{case}");
            assert_eq!(fnv(&low), low_hash, "{case}");
            assert_eq!(fnv(format!("{cpu:?}").as_bytes()), cpu_hash, "{case}");
        }
    }

    #[test]
    fn boot_structures_over_the_kernel_are_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let mut config = config(1);
        config.layout.zero_page = HIMEM_START;
        let err = configure_system(&mem, &kernel, &cmdline, None, &config).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Config(config::Error::OverlapsImage {
                    what: "zero page",
                    with: "kernel",
                    ..
                })
            ),
            "{err:?}"
        );
        // Nothing was written.
        assert_eq!({ zero_page(&mem).hdr.header }, 0);
    }

    #[test]
    fn pvh_boot_follows_the_layout() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_pvh_elf(&[0xf4]))).unwrap();
        let cmdline = build_cmdline(CMDLINE, &[]).unwrap();
        let mut config = config(1);
        config.layout.pvh_start_info = 0x3_0000;
        config.layout.pvh_modlist = 0x3_0100;
        config.layout.pvh_memmap = 0x3_1000;
        config.layout.gdt = 0x3_2000;
        config.layout.idt = 0x3_2100;
        config.layout.cmdline = 0x3_3000;
        config.layout.acpi = 0xf_0000;
        let initrd =
            load_initrd(&mem, &mut Cursor::new(vec![1u8; 0x100]), &kernel, &config).unwrap();
        let cpu = configure_system(&mem, &kernel, &cmdline, Some(initrd), &config).unwrap();
        assert_eq!(cpu.regs.rbx, 0x3_0000);
        assert_eq!(cpu.sregs.gdt.base, 0x3_2000);
        assert_eq!(cpu.sregs.idt.base, 0x3_2100);
        let info: hvm_start_info = mem.read_obj(GuestAddress(0x3_0000)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(
            (
                info.cmdline_paddr,
                info.rsdp_paddr,
                info.memmap_paddr,
                info.modlist_paddr
            ),
            (0x3_3000, 0xf_0000, 0x3_1000, 0x3_0100)
        );
    }
}
