//! The boot configuration: where the boot structures go and what platform they describe.
//!
//! A [`BootConfig`] is what [`configure_system`](crate::configure_system) and
//! [`load_initrd`](crate::load_initrd) take instead of fixed addresses:
//!
//! - [`BootLayout`]: the guest physical addresses of the structures written before the first
//!   instruction (GDT and IDT, PVH start info, Linux zero page, boot stack, page tables, command
//!   line, MP table, ACPI tables) and the firmware range the memory map reports as reserved.
//!   [`BootLayout::default`] is ember's layout ([`layout`]).
//! - [`Platform`]: what the tables describe: the I/O APIC and local APIC addresses, the I/O
//!   APIC's number of pins, the ACPI PM1a ports and SCI line ([`AcpiPm`]), and the 32-bit MMIO
//!   gap where the VMM has no RAM. A platform is the VMM's choice and has no default: the VMM
//!   that owns the address map states it.
//! - the number of vCPUs.
//!
//! [`BootConfig::validate`] checks a configuration on its own (no two structures overlap, the
//! structures lie below the MMIO gap, the APICs inside it, the tables inside the firmware range,
//! ports and lines in range); the boot functions validate it again, and check it against guest
//! memory, the kernel and the initrd, before they write anything.
//!
//! # Example
//!
//! ```
//! use ember_boot::{AcpiPm, BootConfig, Platform};
//!
//! let platform = Platform::new(
//!     0xfec0_0000,
//!     0xfee0_0000,
//!     24,
//!     0xc000_0000..0x1_0000_0000,
//!     AcpiPm::new(0xb000, 0xb004, 9),
//! );
//! let mut config = BootConfig::new(platform, 4);
//! config.layout.zero_page = 0x1_0000;
//! config.validate()?;
//!
//! config.layout.cmdline = 0x1_0800; // inside the zero page
//! assert!(config.validate().is_err());
//! # Ok::<(), ember_boot::config::Error>(())
//! ```

use std::mem::size_of;
use std::ops::Range;

use linux_loader::bootparam::boot_params;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::gdt::GDT_ENTRIES;
use crate::initrd::InitrdRegion;
use crate::kernel::LoadedKernel;
use crate::layout::{self, CMDLINE_MAX_SIZE, HIMEM_START};
use crate::{acpi, e820, mptable, paging};

/// Errors of boot configuration checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vCPU count is 0 or more than the MP table and MADT can describe.
    #[error("The boot configuration has {0} vCPUs; 1 to {max} are supported", max = mptable::MAX_VCPUS)]
    VcpuCount(u8),
    /// The I/O APIC has no pins.
    #[error("The I/O APIC of the boot configuration has no pins")]
    NoIoapicPins,
    /// The SCI is not one of the I/O APIC's pins.
    #[error("The ACPI SCI line {sci} is not one of the I/O APIC's {pins} pins")]
    SciOutOfRange {
        /// The SCI line.
        sci: u32,
        /// Pins of the I/O APIC.
        pins: u8,
    },
    /// A PM1a register block is at port 0 or runs past the last I/O port.
    #[error("The ACPI {what} at I/O port {port:#x} runs past the I/O port space or is at port 0")]
    BadPort {
        /// Which block.
        what: &'static str,
        /// Its first port.
        port: u16,
    },
    /// The PM1a event and control blocks share ports.
    #[error(
        "The ACPI PM1a event block at port {event:#x} and control block at port {control:#x} \
         overlap"
    )]
    PortsOverlap {
        /// First port of the event block.
        event: u16,
        /// First port of the control block.
        control: u16,
    },
    /// The MMIO gap is empty or not below 4 GiB.
    #[error("The MMIO gap {start:#x}..{end:#x} is empty or does not end at or below 4 GiB")]
    BadMmioGap {
        /// Start of the gap.
        start: u64,
        /// End of the gap.
        end: u64,
    },
    /// An APIC's register page is not page-aligned inside the MMIO gap.
    #[error("The {what} at {addr:#x} is not a page-aligned page inside the MMIO gap")]
    ApicOutsideGap {
        /// Which APIC.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// The I/O APIC and the local APIC share their page.
    #[error("The I/O APIC and the local APIC are both at {0:#x}")]
    ApicsOverlap(u64),
    /// A boot structure is not aligned as the hardware or its specification requires.
    #[error("The {what} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Which structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A boot structure does not lie below the MMIO gap (which also keeps it below 4 GiB, where
    /// the boot protocols' 32-bit pointers reach).
    #[error("The {what} of {size} bytes at {addr:#x} does not lie below the MMIO gap at {gap:#x}")]
    AboveMmioGap {
        /// Which structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Its size.
        size: u64,
        /// Start of the MMIO gap.
        gap: u64,
    },
    /// Two boot structures overlap.
    #[error("The {first} at {first_addr:#x} overlaps the {second} at {second_addr:#x}")]
    Overlap {
        /// One structure.
        first: &'static str,
        /// Its address.
        first_addr: u64,
        /// The other structure.
        second: &'static str,
        /// Its address.
        second_addr: u64,
    },
    /// The firmware range is empty, or does not hold a table that must be reserved.
    #[error(
        "The {what} at {addr:#x} is not inside the reserved firmware range {start:#x}..{end:#x}"
    )]
    OutsideFirmware {
        /// Which table.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Start of the firmware range.
        start: u64,
        /// End of the firmware range.
        end: u64,
    },
    /// A boot structure or the firmware range is not in guest memory.
    #[error("The {what} of {size} bytes at {addr:#x} is not in guest memory")]
    NotInMemory {
        /// Which structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// A boot structure or the firmware range overlaps the kernel or the initrd.
    #[error("The {what} at {addr:#x} overlaps the {with} at {with_addr:#x}..{with_end:#x}")]
    OverlapsImage {
        /// Which structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// The kernel or the initrd.
        with: &'static str,
        /// Where the kernel or initrd starts.
        with_addr: u64,
        /// Where it ends.
        with_end: u64,
    },
}

/// Result type of boot configuration checks.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the boot structures go in guest memory, as guest physical addresses.
///
/// Every structure must lie in guest RAM below the MMIO gap; the kernel is loaded from 1 MiB
/// ([`HIMEM_START`]) up and the initrd as high as it can, both clear of these structures. The
/// MP table and ACPI tables must lie inside [`firmware`](Self::firmware), which the memory map
/// reports as reserved so that the kernel keeps them; the others are read by the kernel early
/// and then reused as RAM.
///
/// Linux finds the RSDP from the boot protocol (`acpi_rsdp_addr`, `rsdp_paddr`), wherever it is;
/// it finds the MP table only by scanning the first KiB, the last KiB below 640 KiB and
/// 0xf0000..0x100000, which matters only to a guest that does not use ACPI.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootLayout {
    /// The GDT: 4 entries (null, code, data, TSS), 32 bytes.
    pub gdt: u64,
    /// The IDT: one empty entry, 8 bytes.
    pub idt: u64,
    /// PVH boot: the `hvm_start_info` structure, passed in `rbx`.
    pub pvh_start_info: u64,
    /// PVH boot: the module list, one entry (the initrd).
    pub pvh_modlist: u64,
    /// PVH boot: the memory map, room for [`e820::MAX_ENTRIES`] entries.
    pub pvh_memmap: u64,
    /// Linux boot: the zero page (`boot_params`, 4 KiB), passed in `rsi`.
    pub zero_page: u64,
    /// Linux boot: the initial stack pointer; the stack grows down from it.
    pub boot_stack: u64,
    /// Linux boot: the identity page tables, six 4 KiB-aligned pages (PML4, PDPT, four page
    /// directories).
    pub page_tables: u64,
    /// The kernel command line, [`CMDLINE_MAX_SIZE`] bytes.
    pub cmdline: u64,
    /// The MP table (16-byte aligned), or `None` to describe the CPUs through ACPI only.
    pub mptable: Option<u64>,
    /// The ACPI tables, from the RSDP (64-byte aligned, for the FACS that follows it).
    pub acpi: u64,
    /// The range the memory map reports as reserved: it holds the MP table and ACPI tables.
    pub firmware: Range<u64>,
}

impl Default for BootLayout {
    /// Ember's layout: everything below 1 MiB, at the addresses of [`layout`].
    fn default() -> Self {
        Self {
            gdt: layout::GDT_START,
            idt: layout::IDT_START,
            pvh_start_info: layout::PVH_INFO_START,
            pvh_modlist: layout::PVH_MODLIST_START,
            pvh_memmap: layout::PVH_MEMMAP_START,
            zero_page: layout::ZERO_PAGE_START,
            boot_stack: layout::BOOT_STACK_POINTER,
            page_tables: layout::PAGE_TABLES_START,
            cmdline: layout::CMDLINE_START,
            mptable: Some(layout::MPTABLE_START),
            acpi: layout::ACPI_START,
            firmware: layout::EBDA_START..HIMEM_START,
        }
    }
}

/// The ACPI power management registers and interrupt that the FADT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcpiPm {
    /// First I/O port of the PM1a event block (status and enable registers, 4 bytes).
    pub pm1a_event_port: u16,
    /// First I/O port of the PM1a control block (2 bytes): a guest powers off by writing
    /// [`acpi::S5_SLEEP_TYPE`] with "sleep enable" here.
    pub pm1a_control_port: u16,
    /// The system control interrupt: a pin of the I/O APIC.
    pub sci: u32,
}

impl AcpiPm {
    /// The PM1a event block at `pm1a_event_port`, the control block at `pm1a_control_port`,
    /// the SCI on line `sci`.
    pub fn new(pm1a_event_port: u16, pm1a_control_port: u16, sci: u32) -> Self {
        Self {
            pm1a_event_port,
            pm1a_control_port,
            sci,
        }
    }
}

/// The platform the boot tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Platform {
    /// Address of the I/O APIC's registers.
    pub ioapic: u64,
    /// Address of the local APICs' registers.
    pub lapic: u64,
    /// Interrupt lines of the I/O APIC, routed from GSI 0 identity in the MP table.
    pub ioapic_pins: u8,
    /// The 32-bit MMIO gap: no RAM there (RAM found there is an error), the APICs inside, the
    /// initrd and the boot structures below. It appears as a hole in the memory map.
    pub mmio_gap: Range<u64>,
    /// The ACPI power management registers.
    pub acpi_pm: AcpiPm,
}

impl Platform {
    /// A platform with the I/O APIC at `ioapic` with `ioapic_pins` lines, the local APICs at
    /// `lapic`, the MMIO gap `mmio_gap` and the ACPI PM registers `acpi_pm`.
    pub fn new(
        ioapic: u64,
        lapic: u64,
        ioapic_pins: u8,
        mmio_gap: Range<u64>,
        acpi_pm: AcpiPm,
    ) -> Self {
        Self {
            ioapic,
            lapic,
            ioapic_pins,
            mmio_gap,
            acpi_pm,
        }
    }

    /// Checks the platform on its own.
    ///
    /// # Errors
    ///
    /// [`Error::NoIoapicPins`], [`Error::SciOutOfRange`], [`Error::BadPort`],
    /// [`Error::PortsOverlap`], [`Error::BadMmioGap`], [`Error::ApicOutsideGap`] or
    /// [`Error::ApicsOverlap`].
    pub fn validate(&self) -> Result<()> {
        if self.ioapic_pins == 0 {
            return Err(Error::NoIoapicPins);
        }
        let pm = self.acpi_pm;
        if pm.sci >= u32::from(self.ioapic_pins) {
            return Err(Error::SciOutOfRange {
                sci: pm.sci,
                pins: self.ioapic_pins,
            });
        }
        let event = port_block("PM1a event block", pm.pm1a_event_port, PM1_EVT_LEN)?;
        let control = port_block("PM1a control block", pm.pm1a_control_port, PM1_CNT_LEN)?;
        if overlaps(&event, &control) {
            return Err(Error::PortsOverlap {
                event: pm.pm1a_event_port,
                control: pm.pm1a_control_port,
            });
        }
        let gap = &self.mmio_gap;
        if gap.start >= gap.end || gap.end > FIRST_ADDR_PAST_32BITS {
            return Err(Error::BadMmioGap {
                start: gap.start,
                end: gap.end,
            });
        }
        for (what, addr) in [("I/O APIC", self.ioapic), ("local APIC", self.lapic)] {
            let inside = addr % APIC_PAGE == 0
                && addr >= gap.start
                && addr
                    .checked_add(APIC_PAGE)
                    .is_some_and(|end| end <= gap.end);
            if !inside {
                return Err(Error::ApicOutsideGap { what, addr });
            }
        }
        if self.ioapic == self.lapic {
            return Err(Error::ApicsOverlap(self.ioapic));
        }
        Ok(())
    }
}

/// Lengths of the PM1a event and control blocks, in ports.
pub(crate) const PM1_EVT_LEN: u8 = 4;
pub(crate) const PM1_CNT_LEN: u8 = 2;

/// The APICs' register pages.
const APIC_PAGE: u64 = 0x1000;
const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Alignment of the page tables, the MP floating pointer and the FACS at `acpi + 0x40`.
const PAGE_TABLES_ALIGN: u64 = 0x1000;
const MPTABLE_ALIGN: u64 = 16;
const ACPI_ALIGN: u64 = 64;
/// Bytes of the boot stack checked to be RAM below the stack pointer.
const BOOT_STACK_CHECKED: u64 = 16;

/// The ports `[port, port + len)`, checked to be inside the I/O space and not at port 0.
fn port_block(what: &'static str, port: u16, len: u8) -> Result<Range<u32>> {
    let start = u32::from(port);
    let end = start + u32::from(len);
    if port == 0 || end > 0x1_0000 {
        return Err(Error::BadPort { what, port });
    }
    Ok(start..end)
}

fn overlaps<T: PartialOrd>(a: &Range<T>, b: &Range<T>) -> bool {
    a.start < b.end && b.start < a.end
}

/// One boot structure: its name and the range it occupies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Region {
    pub(crate) what: &'static str,
    pub(crate) range: Range<u64>,
    /// Whether the memory map must report it reserved: the tables the kernel keeps.
    reserved: bool,
}

/// Most regions a configuration has: eleven boot structures and the firmware range.
const MAX_REGIONS: usize = 12;

/// The regions of a configuration, without a heap allocation: the checks run on every boot.
#[derive(Debug)]
pub(crate) struct Regions {
    items: [Region; MAX_REGIONS],
    len: usize,
}

impl Regions {
    const EMPTY: Region = Region {
        what: "",
        range: 0..0,
        reserved: false,
    };

    fn new() -> Self {
        Self {
            items: [Self::EMPTY; MAX_REGIONS],
            len: 0,
        }
    }

    /// Appends `region`; there is room for every region a configuration has.
    fn push(&mut self, region: Region) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = region;
            self.len += 1;
        }
    }
}

impl std::ops::Deref for Regions {
    type Target = [Region];

    fn deref(&self) -> &[Region] {
        &self.items[..self.len]
    }
}

/// Everything [`configure_system`](crate::configure_system) and
/// [`load_initrd`](crate::load_initrd) need to know about the guest's platform and where to put
/// the boot structures.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootConfig {
    /// Number of vCPUs the MP table and the MADT describe, 1 to [`mptable::MAX_VCPUS`].
    pub vcpus: u8,
    /// Where the boot structures go.
    pub layout: BootLayout,
    /// What the tables describe.
    pub platform: Platform,
}

impl BootConfig {
    /// A configuration for `vcpus` vCPUs on `platform`, with ember's [`BootLayout::default`].
    pub fn new(platform: Platform, vcpus: u8) -> Self {
        Self {
            vcpus,
            layout: BootLayout::default(),
            platform,
        }
    }

    /// This configuration with the boot structures at `layout`.
    #[must_use]
    pub fn with_layout(mut self, layout: BootLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Checks the configuration on its own, without guest memory.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuCount`], any error of [`Platform::validate`], and for the layout:
    /// [`Error::Misaligned`], [`Error::AboveMmioGap`], [`Error::Overlap`] or
    /// [`Error::OutsideFirmware`].
    pub fn validate(&self) -> Result<()> {
        self.checked_regions().map(drop)
    }

    /// [`validate`](Self::validate), returning the boot structures and the firmware range.
    pub(crate) fn checked_regions(&self) -> Result<Regions> {
        if self.vcpus == 0 || self.vcpus > mptable::MAX_VCPUS {
            return Err(Error::VcpuCount(self.vcpus));
        }
        self.platform.validate()?;
        let layout = &self.layout;
        let aligned = [
            Some(("page tables", layout.page_tables, PAGE_TABLES_ALIGN)),
            Some(("ACPI tables", layout.acpi, ACPI_ALIGN)),
            layout.mptable.map(|addr| ("MP table", addr, MPTABLE_ALIGN)),
        ];
        for (what, addr, align) in aligned.into_iter().flatten() {
            if addr % align != 0 {
                return Err(Error::Misaligned { what, addr, align });
            }
        }

        let gap = self.platform.mmio_gap.start;
        let regions = self.regions();
        for region in regions.iter() {
            if region.range.end > gap || region.range.start >= region.range.end {
                return Err(Error::AboveMmioGap {
                    what: region.what,
                    addr: region.range.start,
                    size: region.range.end.saturating_sub(region.range.start),
                    gap,
                });
            }
        }
        for (i, first) in regions.iter().enumerate() {
            if let Some(second) = regions[i + 1..]
                .iter()
                .find(|second| overlaps(&first.range, &second.range))
            {
                return Err(Error::Overlap {
                    first: first.what,
                    first_addr: first.range.start,
                    second: second.what,
                    second_addr: second.range.start,
                });
            }
        }

        let firmware = &layout.firmware;
        if firmware.end > gap {
            return Err(Error::AboveMmioGap {
                what: "firmware range",
                addr: firmware.start,
                size: firmware.end.saturating_sub(firmware.start),
                gap,
            });
        }
        for region in regions.iter().filter(|r| r.reserved) {
            if region.range.start < firmware.start || region.range.end > firmware.end {
                return Err(Error::OutsideFirmware {
                    what: region.what,
                    addr: region.range.start,
                    start: firmware.start,
                    end: firmware.end,
                });
            }
        }
        let mut regions = regions;
        regions.push(self.firmware_region());
        Ok(regions)
    }

    /// Checks the configuration against guest memory, the loaded kernel and the initrd: every
    /// structure and the firmware range in `mem`, none of them over the kernel (from
    /// [`HIMEM_START`] to [`LoadedKernel::footprint_end`]) or the initrd.
    ///
    /// # Errors
    ///
    /// [`Error::NotInMemory`] or [`Error::OverlapsImage`].
    pub fn check_placement<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        kernel: &LoadedKernel,
        initrd: Option<InitrdRegion>,
    ) -> Result<()> {
        check_placement(&self.regions_and_firmware(), mem, kernel, initrd)
    }

    /// The boot structures, in address order of the default layout. Sizes that depend on the
    /// vCPU count assume a valid one; ranges that would overflow end at `u64::MAX`, which the
    /// checks above reject.
    pub(crate) fn regions(&self) -> Regions {
        let l = &self.layout;
        let region = |what, start: u64, size: usize| Region {
            what,
            range: start..start.saturating_add(u64::try_from(size).unwrap_or(u64::MAX)),
            reserved: false,
        };
        let vcpus = self.vcpus.clamp(1, mptable::MAX_VCPUS);
        let mut regions = Regions::new();
        for region in [
            region("GDT", l.gdt, GDT_ENTRIES * 8),
            region("IDT", l.idt, 8),
            region(
                "PVH start info",
                l.pvh_start_info,
                size_of::<hvm_start_info>(),
            ),
            region(
                "PVH module list",
                l.pvh_modlist,
                size_of::<hvm_modlist_entry>(),
            ),
            region(
                "PVH memory map",
                l.pvh_memmap,
                e820::MAX_ENTRIES * size_of::<hvm_memmap_table_entry>(),
            ),
            region("zero page", l.zero_page, size_of::<boot_params>()),
            Region {
                what: "boot stack",
                range: l.boot_stack.saturating_sub(BOOT_STACK_CHECKED)..l.boot_stack,
                reserved: false,
            },
            region("page tables", l.page_tables, paging::TABLES_SIZE),
            region("command line", l.cmdline, CMDLINE_MAX_SIZE),
        ] {
            regions.push(region);
        }
        let reserved = |region: Region| Region {
            reserved: true,
            ..region
        };
        if let Some(mptable) = l.mptable {
            regions.push(reserved(region(
                "MP table",
                mptable,
                mptable::mptable_size(vcpus, self.platform.ioapic_pins),
            )));
        }
        regions.push(reserved(region(
            "ACPI tables",
            l.acpi,
            acpi::tables_size(vcpus),
        )));
        regions
    }

    /// The boot structures and the firmware range: what must be in memory and clear of the
    /// kernel and the initrd.
    pub(crate) fn regions_and_firmware(&self) -> Regions {
        let mut regions = self.regions();
        regions.push(self.firmware_region());
        regions
    }

    fn firmware_region(&self) -> Region {
        Region {
            what: "firmware range",
            range: self.layout.firmware.clone(),
            reserved: false,
        }
    }
}

/// [`BootConfig::check_placement`] of the configuration's `regions`.
pub(crate) fn check_placement<M: GuestMemoryBackend>(
    regions: &Regions,
    mem: &M,
    kernel: &LoadedKernel,
    initrd: Option<InitrdRegion>,
) -> Result<()> {
    let kernel_range = HIMEM_START..kernel.footprint_end().0.max(HIMEM_START);
    let initrd_range = initrd.map(|initrd| {
        let size = u64::try_from(initrd.size).unwrap_or(u64::MAX);
        initrd.addr.0..initrd.addr.0.saturating_add(size)
    });
    // One look-up for the first MiB, where most layouts put everything.
    // HIMEM_START is 1 MiB: the cast cannot truncate.
    let low_memory = GuestMemoryBackend::check_range(mem, GuestAddress(0), HIMEM_START as usize);
    for region in regions.iter() {
        let (start, size) = (
            region.range.start,
            region.range.end.saturating_sub(region.range.start),
        );
        let in_memory = (low_memory && region.range.end <= HIMEM_START)
            || usize::try_from(size)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(start), len));
        if !in_memory {
            return Err(Error::NotInMemory {
                what: region.what,
                addr: start,
                size,
            });
        }
        let images = std::iter::once(("kernel", kernel_range.clone()))
            .chain(initrd_range.clone().map(|range| ("initrd", range)));
        for (with, range) in images {
            if overlaps(&region.range, &range) {
                return Err(Error::OverlapsImage {
                    what: region.what,
                    addr: start,
                    with,
                    with_addr: range.start,
                    with_end: range.end,
                });
            }
        }
    }
    Ok(())
}

/// The platform of the crate's unit tests: a PC's APICs, 24 I/O APIC lines, a 768 MiB gap below
/// 4 GiB, the PM1a blocks at 0x600 and 0x604, the SCI on line 3.
#[cfg(test)]
pub(crate) fn test_platform() -> Platform {
    Platform::new(
        0xfec0_0000,
        0xfee0_0000,
        24,
        0xd000_0000..FIRST_ADDR_PAST_32BITS,
        AcpiPm::new(0x600, 0x604, 3),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    use crate::kernel::load_kernel;
    use crate::test_utils::tiny_elf;

    fn platform() -> Platform {
        test_platform()
    }

    fn config() -> BootConfig {
        BootConfig::new(platform(), 2)
    }

    fn with(change: impl FnOnce(&mut BootConfig)) -> Result<()> {
        let mut config = config();
        change(&mut config);
        config.validate()
    }

    #[test]
    fn default_layout_is_valid_for_every_vcpu_count() {
        for vcpus in [1, 2, mptable::MAX_VCPUS] {
            BootConfig::new(platform(), vcpus).validate().unwrap();
        }
    }

    #[test]
    fn vcpu_counts_out_of_range_are_rejected() {
        for vcpus in [0, 255] {
            assert_eq!(with(|c| c.vcpus = vcpus), Err(Error::VcpuCount(vcpus)));
        }
    }

    #[test]
    fn overlapping_structures_are_rejected_naming_both() {
        let err = with(|c| c.layout.cmdline = c.layout.zero_page + 0x800).unwrap_err();
        assert_eq!(
            err,
            Error::Overlap {
                first: "zero page",
                first_addr: 0x7000,
                second: "command line",
                second_addr: 0x7800
            }
        );
        assert!(err.to_string().contains("zero page"), "{err}");
        assert!(matches!(
            with(|c| c.layout.idt = c.layout.gdt + 8),
            Err(Error::Overlap { first: "GDT", .. })
        ));
        assert!(matches!(
            with(|c| c.layout.acpi = c.layout.mptable.unwrap() + 0x40),
            Err(Error::Overlap { .. })
        ));
    }

    #[test]
    fn structures_must_lie_below_the_mmio_gap() {
        assert!(matches!(
            with(|c| c.layout.zero_page = 0xd000_0000),
            Err(Error::AboveMmioGap {
                what: "zero page",
                ..
            })
        ));
        assert!(matches!(
            with(|c| c.layout.cmdline = u64::MAX - 10),
            Err(Error::AboveMmioGap { .. })
        ));
        assert!(matches!(
            with(|c| c.layout.firmware = 0xcfff_0000..0xd000_1000),
            Err(Error::AboveMmioGap { .. })
        ));
    }

    #[test]
    fn tables_must_lie_in_the_reserved_firmware_range() {
        assert!(matches!(
            with(|c| c.layout.acpi = 0x3_0000),
            Err(Error::OutsideFirmware {
                what: "ACPI tables",
                ..
            })
        ));
        assert!(matches!(
            with(|c| c.layout.firmware = 0xe_0000..HIMEM_START),
            Err(Error::OutsideFirmware {
                what: "MP table",
                ..
            })
        ));
        // Without an MP table, the firmware range only needs the ACPI tables.
        with(|c| {
            c.layout.mptable = None;
            c.layout.firmware = 0xe_0000..HIMEM_START;
        })
        .unwrap();
    }

    #[test]
    fn misaligned_tables_are_rejected() {
        for (change, what) in [
            (
                (|c: &mut BootConfig| c.layout.page_tables += 8) as fn(&mut BootConfig),
                "page tables",
            ),
            (|c| c.layout.acpi += 16, "ACPI tables"),
            (|c| c.layout.mptable = Some(0x9fc08), "MP table"),
        ] {
            assert!(
                matches!(with(change), Err(Error::Misaligned { what: w, .. }) if w == what),
                "{what}"
            );
        }
    }

    #[test]
    fn platform_errors_are_reported() {
        assert_eq!(
            with(|c| c.platform.ioapic_pins = 0),
            Err(Error::NoIoapicPins)
        );
        assert_eq!(
            with(|c| c.platform.acpi_pm.sci = 24),
            Err(Error::SciOutOfRange { sci: 24, pins: 24 })
        );
        assert!(matches!(
            with(|c| c.platform.acpi_pm.pm1a_event_port = 0xfffe),
            Err(Error::BadPort { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.acpi_pm.pm1a_control_port = 0),
            Err(Error::BadPort { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.acpi_pm.pm1a_control_port = 0x602),
            Err(Error::PortsOverlap { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.mmio_gap = 0xd000_0000..0x1_0000_1000),
            Err(Error::BadMmioGap { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.mmio_gap = 0xd000_0000..0xd000_0000),
            Err(Error::BadMmioGap { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.ioapic = 0xc000_0000),
            Err(Error::ApicOutsideGap {
                what: "I/O APIC",
                ..
            })
        ));
        assert!(matches!(
            with(|c| c.platform.lapic = 0xffff_f800),
            Err(Error::ApicOutsideGap { .. })
        ));
        assert!(matches!(
            with(|c| c.platform.lapic = c.platform.ioapic),
            Err(Error::ApicsOverlap(_))
        ));
    }

    #[test]
    fn placement_needs_the_structures_in_memory_and_clear_of_the_images() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let kernel = load_kernel(&mem, &mut Cursor::new(tiny_elf(&[0xf4]))).unwrap();
        let config = config();
        config.check_placement(&mem, &kernel, None).unwrap();

        let mut high = config.clone();
        high.layout.cmdline = 16 << 20;
        assert!(matches!(
            high.check_placement(&mem, &kernel, None),
            Err(Error::NotInMemory {
                what: "command line",
                ..
            })
        ));
        high.layout.cmdline = HIMEM_START;
        assert!(matches!(
            high.check_placement(&mem, &kernel, None),
            Err(Error::OverlapsImage { with: "kernel", .. })
        ));
        high.layout.cmdline = 4 << 20;
        let initrd = InitrdRegion {
            addr: GuestAddress(4 << 20),
            size: 0x1000,
        };
        assert!(matches!(
            high.check_placement(&mem, &kernel, Some(initrd)),
            Err(Error::OverlapsImage { with: "initrd", .. })
        ));
    }
}
