//! The KVM virtual machine: guest memory slots, in-kernel interrupt controllers and timer.
//!
//! [`Vm::new`] sets a VM up in the order KVM and the host want it:
//!
//! 1. one memory slot per guest memory region (before the irqchip: registering slots after
//!    `KVM_CREATE_IRQCHIP` is two orders of magnitude slower on some hosts),
//! 2. the TSS and identity-map pages KVM needs for real-mode emulation on Intel,
//! 3. the in-kernel irqchip (PIC, I/O APIC, local APICs), which must exist before any vCPU,
//! 4. the in-kernel PIT.
//!
//! The [`Vm`] owns a reference to the guest memory for as long as the kernel may use the memory
//! slots that point into it, see [`Vm`].
//!
//! With [`VmOptions::track_dirty_pages`], KVM logs the guest's writes to its memory, page by
//! page, and [`Vm::dirty_log`] reads and resets the log: what a diff snapshot writes.
//!
//! [`Vm::save_state`] reads what KVM keeps of the VM outside its vCPUs and guest memory (the PIT,
//! the KVM clock, the two PICs and the I/O APIC) into a [`VmState`];
//! [`Vm::restore_state`] loads one into a new VM.

use std::fmt;
use std::os::raw::c_char;
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_clock_data,
    kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region, kvm_xsave,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::cpuid::add_tsc_deadline_timer;
use crate::metrics::VcpuMetrics;
use crate::msr;

/// Guest physical address of the three pages KVM uses for the real-mode TSS on Intel hosts. It
/// lies in the 32-bit MMIO gap, above the local APIC, where no RAM or device is.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Guest physical address of the page KVM uses for the identity-mapped page table of real mode on
/// Intel hosts, just below [`KVM_TSS_ADDRESS`].
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors of VM setup and VM-wide KVM requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `KVM_CREATE_VM` failed.
    #[error("Cannot create the KVM virtual machine")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// The guest memory has more regions than KVM has memory slots.
    #[error("The guest memory has {regions} regions but KVM offers only {slots} memory slots")]
    TooManyRegions {
        /// Regions of the guest memory.
        regions: usize,
        /// Memory slots KVM offers.
        slots: usize,
    },
    /// A slot number or a region size does not fit the KVM ABI.
    #[error("The guest memory region at {addr:#x} cannot be described to KVM")]
    RegionOutOfRange {
        /// Guest physical address of the region.
        addr: u64,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error(
        "Cannot register the guest memory region at {addr:#x} ({size:#x} bytes) as slot {slot}"
    )]
    SetMemoryRegion {
        /// The slot number.
        slot: u32,
        /// Guest physical address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("Cannot set the KVM TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("Cannot set the KVM identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("Cannot create the in-kernel interrupt controllers")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("Cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("Cannot read the CPUID leaves KVM supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("Cannot read the list of MSRs KVM saves")]
    GetMsrIndexList(#[source] kvm_ioctls::Error),
    /// `KVM_IRQFD` failed.
    #[error("Cannot connect an event file descriptor to interrupt line {gsi}")]
    RegisterIrqfd {
        /// The interrupt line.
        gsi: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` with the deassign flag failed.
    #[error("Cannot disconnect an event file descriptor from interrupt line {gsi}")]
    UnregisterIrqfd {
        /// The interrupt line.
        gsi: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("Cannot connect an event file descriptor to guest writes at {0:?}")]
    RegisterIoevent(IoEventAddress, #[source] kvm_ioctls::Error),
    /// `KVM_IOEVENTFD` with the deassign flag failed.
    #[error("Cannot disconnect an event file descriptor from guest writes at {0:?}")]
    UnregisterIoevent(IoEventAddress, #[source] kvm_ioctls::Error),
    /// `KVM_IRQ_LINE` failed.
    #[error("Cannot set interrupt line {irq}")]
    SetIrqLine {
        /// The interrupt line.
        irq: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_PIT2` failed.
    #[error("Cannot read the state of the PIT")]
    GetPit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_PIT2` failed.
    #[error("Cannot restore the state of the PIT")]
    SetPit(#[source] kvm_ioctls::Error),
    /// `KVM_GET_CLOCK` failed.
    #[error("Cannot read the KVM clock")]
    GetClock(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CLOCK` failed.
    #[error("Cannot restore the KVM clock")]
    SetClock(#[source] kvm_ioctls::Error),
    /// `KVM_GET_IRQCHIP` failed.
    #[error("Cannot read the state of the {chip}")]
    GetIrqChip {
        /// The interrupt controller.
        chip: IrqChip,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_IRQCHIP` failed.
    #[error("Cannot restore the state of the {chip}")]
    SetIrqChip {
        /// The interrupt controller.
        chip: IrqChip,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The dirty log was asked of a VM that does not track dirty pages.
    #[error("The VM does not track dirty pages: create it with VmOptions::track_dirty_pages")]
    DirtyPagesNotTracked,
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("Cannot read the dirty log of memory slot {slot}")]
    GetDirtyLog {
        /// The slot number.
        slot: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved interrupt controller state is not the size KVM's is.
    #[error("The saved state of the {chip} has {len} bytes, not {IRQCHIP_STATE_SIZE}")]
    IrqChipStateSize {
        /// The interrupt controller.
        chip: IrqChip,
        /// The size of the saved state.
        len: usize,
    },
}

/// Result type of VM operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How [`Vm::new_with`] sets a VM up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmOptions {
    /// Have KVM log the pages the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`), for
    /// [`Vm::dirty_log`]. It costs a little on every first write to a page after each read of
    /// the log. Off by default.
    pub track_dirty_pages: bool,
}

impl VmOptions {
    /// The defaults: no dirty page tracking.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracks dirty pages, or not.
    pub fn track_dirty_pages(mut self, track: bool) -> Self {
        self.track_dirty_pages = track;
        self
    }
}

/// Size in bytes of the state of one in-kernel interrupt controller (the union of
/// `struct kvm_irqchip`).
pub const IRQCHIP_STATE_SIZE: usize = 512;

/// One of the in-kernel interrupt controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IrqChip {
    /// The master 8259 PIC (IRQs 0 to 7).
    PicMaster,
    /// The slave 8259 PIC (IRQs 8 to 15).
    PicSlave,
    /// The I/O APIC.
    Ioapic,
}

impl IrqChip {
    /// KVM's number of the chip (`KVM_IRQCHIP_*`).
    fn kvm_id(self) -> u32 {
        match self {
            IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
            IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
            IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
        }
    }
}

impl fmt::Display for IrqChip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IrqChip::PicMaster => "master PIC",
            IrqChip::PicSlave => "slave PIC",
            IrqChip::Ioapic => "I/O APIC",
        })
    }
}

/// The saved state of one in-kernel interrupt controller: the bytes of the union of
/// `struct kvm_irqchip` as `KVM_GET_IRQCHIP` returned them ([`IRQCHIP_STATE_SIZE`] bytes, a
/// `struct kvm_pic_state` or `struct kvm_ioapic_state` followed by zeros).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqChipState {
    /// The state, in KVM's layout.
    pub bytes: Vec<u8>,
}

/// What KVM keeps of a VM outside its vCPUs and guest memory, as [`Vm::save_state`] read it.
///
/// The structures are KVM's own, serialized as their bytes. A state read from a file is
/// untrusted: [`Vm::restore_state`] checks the sizes, and KVM checks the values it loads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmState {
    /// The in-kernel PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// The KVM clock (`KVM_GET_CLOCK`): the guest's kvmclock in nanoseconds. Its flags are
    /// cleared when saved: a restored clock goes on from the saved value, as after a pause,
    /// whatever time passed in between.
    pub clock: kvm_clock_data,
    /// The master PIC.
    pub pic_master: IrqChipState,
    /// The slave PIC.
    pub pic_slave: IrqChipState,
    /// The I/O APIC.
    pub ioapic: IrqChipState,
}

/// A KVM virtual machine with its guest memory registered, an in-kernel irqchip and a PIT.
///
/// # Memory safety of the memory slots
///
/// A KVM memory slot points at the host mapping of a guest memory region; the kernel reads and
/// writes through it until the slot is removed, which happens when the last file descriptor
/// referring to the VM is closed. The mapping must therefore stay mapped for at least that long.
/// The type system holds this:
///
/// - the `Vm` keeps an [`Arc`] of the memory in a field declared after the VM file descriptor,
///   and Rust drops fields in declaration order, so the VM fd is closed before the `Vm`'s
///   reference to the memory is released;
/// - each [`Vcpu`](crate::Vcpu), whose file descriptor also keeps the VM alive in the kernel,
///   holds its own reference to the memory, dropped after its fd;
/// - [`GuestMemoryMmap`] never moves or unmaps a region while a reference to it exists, and the
///   raw VM file descriptor is not handed out, so nothing else can extend the VM's life.
#[derive(Debug)]
pub struct Vm<B: Bitmap + 'static = ()> {
    /// The VM file descriptor. Declared first, and so dropped first, see the type's docs.
    fd: VmFd,
    /// What `KVM_GET_SUPPORTED_CPUID` reported, the base of every vCPU's CPUID.
    supported_cpuid: CpuId,
    /// The most vCPUs KVM accepts in one VM.
    max_vcpus: usize,
    /// The guest memory the memory slots point into. Dropped after `fd`.
    memory: Arc<GuestMemoryMmap<B>>,
    /// The exit counters of the VM's vCPUs.
    vcpu_metrics: Arc<VcpuMetrics>,
    /// What the vCPUs need to know of KVM to save and restore their state.
    snapshot_caps: Arc<SnapshotCaps>,
    /// How the VM was set up.
    options: VmOptions,
}

/// What KVM offers for saving and restoring vCPUs, learned once per VM.
#[derive(Debug)]
pub(crate) struct SnapshotCaps {
    /// The MSRs a vCPU snapshot holds: KVM's list filtered by [`msr::is_saved`], in KVM's
    /// order, then those of [`msr::unlisted`] KVM did not list.
    pub(crate) msrs_to_save: Vec<u32>,
    /// Size in bytes of the XSAVE area KVM reads and writes, at least the 4096 bytes of
    /// `struct kvm_xsave`; `None` when KVM has no XSAVE and the vCPUs save their FPU instead.
    pub(crate) xsave_size: Option<usize>,
    /// KVM saves and restores the extended control registers (`KVM_CAP_XCRS`).
    pub(crate) xcrs: bool,
    /// KVM can run a vCPU's TSC at another frequency than the host's (`KVM_CAP_TSC_CONTROL`).
    pub(crate) tsc_control: bool,
}

impl SnapshotCaps {
    fn new(kvm: &Kvm, fd: &VmFd) -> Result<Self> {
        let mut msrs_to_save: Vec<u32> = kvm
            .get_msr_index_list()
            .map_err(Error::GetMsrIndexList)?
            .as_slice()
            .iter()
            .copied()
            .filter(|&index| msr::is_saved(index))
            .collect();
        for index in msr::unlisted() {
            if !msrs_to_save.contains(&index) {
                msrs_to_save.push(index);
            }
        }
        let kvm_xsave_size = std::mem::size_of::<kvm_xsave>();
        let xsave_size =
            if let Ok(size @ 1..) = usize::try_from(fd.check_extension_int(Cap::Xsave2)) {
                Some(size.max(kvm_xsave_size))
            } else if kvm.check_extension(Cap::Xsave) {
                Some(kvm_xsave_size)
            } else {
                None
            };
        Ok(SnapshotCaps {
            msrs_to_save,
            xsave_size,
            xcrs: kvm.check_extension(Cap::Xcrs),
            tsc_control: kvm.check_extension(Cap::TscControl),
        })
    }
}

impl<B: Bitmap + Send + Sync + 'static> Vm<B> {
    /// Creates a VM backed by `memory`: one memory slot per region (slot numbers in region
    /// order), the TSS at [`KVM_TSS_ADDRESS`], the identity map at [`KVM_IDENTITY_MAP_ADDRESS`],
    /// the in-kernel irqchip and a PIT whose speaker port is a dummy.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyRegions`] when KVM has fewer slots than `memory` has regions; otherwise
    /// the variant that names the failed KVM request.
    pub fn new(kvm: &Kvm, memory: Arc<GuestMemoryMmap<B>>) -> Result<Self> {
        Self::new_with(kvm, memory, VmOptions::default())
    }

    /// As [`Vm::new`], with `options`.
    ///
    /// # Errors
    ///
    /// As [`Vm::new`].
    pub fn new_with(
        kvm: &Kvm,
        memory: Arc<GuestMemoryMmap<B>>,
        options: VmOptions,
    ) -> Result<Self> {
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        let flags = match options.track_dirty_pages {
            true => KVM_MEM_LOG_DIRTY_PAGES,
            false => 0,
        };

        let regions = memory.num_regions();
        let slots = kvm.get_nr_memslots();
        if regions > slots {
            return Err(Error::TooManyRegions { regions, slots });
        }
        for (index, region) in memory.iter().enumerate() {
            let addr = region.start_addr().raw_value();
            let slot = u32::try_from(index).map_err(|_| Error::RegionOutOfRange { addr })?;
            let size = region.len();
            let host_addr = region.as_ptr() as u64;
            let description = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: addr,
                memory_size: size,
                userspace_addr: host_addr,
            };
            register_slot(&fd, description).map_err(|source| Error::SetMemoryRegion {
                slot,
                addr,
                size,
                source,
            })?;
        }

        let tss = usize::try_from(KVM_TSS_ADDRESS).map_err(|_| Error::RegionOutOfRange {
            addr: KVM_TSS_ADDRESS,
        })?;
        fd.set_tss_address(tss).map_err(Error::SetTssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(Error::SetIdentityMapAddress)?;
        fd.create_irq_chip().map_err(Error::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::CreatePit)?;

        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::GetSupportedCpuid)?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            add_tsc_deadline_timer(&mut supported_cpuid);
        }
        // KVM fills a few dozen of the entries it was given room for; the VM keeps only those
        // (10 KiB of room otherwise, for as long as it runs).
        let supported_cpuid =
            CpuId::from_entries(supported_cpuid.as_slice()).unwrap_or(supported_cpuid);
        let max_vcpus = kvm.get_max_vcpus();
        let snapshot_caps = Arc::new(SnapshotCaps::new(kvm, &fd)?);

        Ok(Vm {
            fd,
            supported_cpuid,
            max_vcpus,
            memory,
            vcpu_metrics: Arc::default(),
            snapshot_caps,
            options,
        })
    }

    /// The exit counters every vCPU of this VM counts into.
    pub fn vcpu_metrics(&self) -> &Arc<VcpuMetrics> {
        &self.vcpu_metrics
    }

    /// The guest memory the VM runs on.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap<B>> {
        &self.memory
    }

    /// How the VM was set up.
    pub fn options(&self) -> VmOptions {
        self.options
    }

    /// Reads and resets the log of the pages the guest wrote since the last read, or since the
    /// VM was created (`KVM_GET_DIRTY_LOG`): one bitmap per memory region, in region order,
    /// with one bit per 4 KiB page (bit `n % 64` of word `n / 64` for page `n` of the region).
    /// Writes the VMM makes through its own mapping are not logged.
    ///
    /// # Errors
    ///
    /// [`Error::DirtyPagesNotTracked`] when the VM was not created with
    /// [`VmOptions::track_dirty_pages`]; [`Error::GetDirtyLog`] when KVM fails.
    pub fn dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        if !self.options.track_dirty_pages {
            return Err(Error::DirtyPagesNotTracked);
        }
        self.memory
            .iter()
            .enumerate()
            .map(|(index, region)| {
                // `new_with` registered every region as the slot of its index.
                let slot = u32::try_from(index).map_err(|_| Error::RegionOutOfRange {
                    addr: region.start_addr().raw_value(),
                })?;
                let size = usize::try_from(region.len()).map_err(|_| Error::RegionOutOfRange {
                    addr: region.start_addr().raw_value(),
                })?;
                self.fd
                    .get_dirty_log(slot, size)
                    .map_err(|source| Error::GetDirtyLog { slot, source })
            })
            .collect()
    }

    /// The most vCPUs KVM accepts in one VM (`KVM_CAP_MAX_VCPUS`).
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// Makes a write to `fd` raise interrupt line `gsi` of the in-kernel irqchip (`KVM_IRQFD`).
    ///
    /// # Errors
    ///
    /// [`Error::RegisterIrqfd`] when KVM refuses, for example for a line the irqchip lacks.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|source| Error::RegisterIrqfd { gsi, source })
    }

    /// Undoes [`Vm::register_irqfd`].
    ///
    /// # Errors
    ///
    /// [`Error::UnregisterIrqfd`] when `fd` was not registered for `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(|source| Error::UnregisterIrqfd { gsi, source })
    }

    /// Makes a guest write at `addr` signal `fd` inside the kernel instead of exiting to the
    /// vCPU loop (`KVM_IOEVENTFD`); with a `datamatch` other than
    /// [`NoDatamatch`](kvm_ioctls::NoDatamatch) only writes of that value, of its size, do.
    ///
    /// # Errors
    ///
    /// [`Error::RegisterIoevent`] when KVM refuses, for example for an address already taken.
    pub fn register_ioevent<T: Into<u64>>(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: T,
    ) -> Result<()> {
        self.fd
            .register_ioevent(fd, &addr, datamatch)
            .map_err(|source| Error::RegisterIoevent(addr, source))
    }

    /// Undoes [`Vm::register_ioevent`]; `datamatch` must be the one registered.
    ///
    /// # Errors
    ///
    /// [`Error::UnregisterIoevent`] when no such registration exists.
    pub fn unregister_ioevent<T: Into<u64>>(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: T,
    ) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &addr, datamatch)
            .map_err(|source| Error::UnregisterIoevent(addr, source))
    }

    /// Sets the level of interrupt line `irq` of the in-kernel irqchip (`KVM_IRQ_LINE`).
    ///
    /// # Errors
    ///
    /// [`Error::SetIrqLine`] when KVM refuses the line.
    pub fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, active)
            .map_err(|source| Error::SetIrqLine { irq, source })
    }

    /// Reads the state of the PIT, the KVM clock and the interrupt controllers.
    ///
    /// Save it while the vCPUs are paused, after their states, so that it holds what they left.
    ///
    /// # Errors
    ///
    /// The variant naming the failed KVM request.
    pub fn save_state(&self) -> Result<VmState> {
        let pit = self.fd.get_pit2().map_err(Error::GetPit)?;
        let mut clock = self.fd.get_clock().map_err(Error::GetClock)?;
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        Ok(VmState {
            pit,
            clock,
            pic_master: self.irqchip_state(IrqChip::PicMaster)?,
            pic_slave: self.irqchip_state(IrqChip::PicSlave)?,
            ioapic: self.irqchip_state(IrqChip::Ioapic)?,
        })
    }

    /// Loads `state` into this VM, made by [`Vm::new`], before its vCPUs run.
    ///
    /// # Errors
    ///
    /// [`Error::IrqChipStateSize`] when an interrupt controller's state is not
    /// [`IRQCHIP_STATE_SIZE`] bytes (nothing is loaded then); otherwise the variant naming the
    /// KVM request that refused its part of the state.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        let chips = [
            (IrqChip::PicMaster, &state.pic_master),
            (IrqChip::PicSlave, &state.pic_slave),
            (IrqChip::Ioapic, &state.ioapic),
        ]
        .map(|(chip, saved)| kvm_irqchip_from(chip, saved));
        let chips: Vec<(IrqChip, kvm_irqchip)> = chips.into_iter().collect::<Result<_>>()?;

        self.fd.set_pit2(&state.pit).map_err(Error::SetPit)?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(Error::SetClock)?;
        for (chip, kvm_chip) in &chips {
            self.fd
                .set_irqchip(kvm_chip)
                .map_err(|source| Error::SetIrqChip {
                    chip: *chip,
                    source,
                })?;
        }
        Ok(())
    }

    fn irqchip_state(&self, chip: IrqChip) -> Result<IrqChipState> {
        let mut kvm_chip = kvm_irqchip {
            chip_id: chip.kvm_id(),
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut kvm_chip)
            .map_err(|source| Error::GetIrqChip { chip, source })?;
        // SAFETY: `kvm_chip` was zeroed whole by `Default` and then written by the kernel, so
        // every byte of the union is initialized and its byte view may be read.
        let raw = unsafe { kvm_chip.chip.dummy };
        Ok(IrqChipState {
            bytes: raw.iter().map(|byte| byte.to_ne_bytes()[0]).collect(),
        })
    }

    /// The VM file descriptor, for the vCPUs of this crate only: a vCPU fd created from it must
    /// keep the guest memory alive, which [`Vcpu`](crate::Vcpu) does.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID leaves KVM supports, unfiltered.
    pub(crate) fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// What the vCPUs need to know of KVM to save and restore their state.
    pub(crate) fn snapshot_caps(&self) -> &Arc<SnapshotCaps> {
        &self.snapshot_caps
    }

    /// A reference to the guest memory, for vCPUs to keep it mapped.
    pub(crate) fn memory_keepalive(&self) -> MemoryKeepalive {
        MemoryKeepalive {
            _memory: self.memory.clone(),
        }
    }
}

/// A type-erased reference to guest memory that keeps it mapped while held.
pub(crate) struct MemoryKeepalive {
    /// Never read: holding it is the point.
    _memory: Arc<dyn Send + Sync>,
}

impl fmt::Debug for MemoryKeepalive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryKeepalive")
    }
}

/// The `kvm_irqchip` that loads `saved` into `chip`.
fn kvm_irqchip_from(chip: IrqChip, saved: &IrqChipState) -> Result<(IrqChip, kvm_irqchip)> {
    let len = saved.bytes.len();
    if len != IRQCHIP_STATE_SIZE {
        return Err(Error::IrqChipStateSize { chip, len });
    }
    let mut raw = [0 as c_char; IRQCHIP_STATE_SIZE];
    for (to, from) in raw.iter_mut().zip(&saved.bytes) {
        *to = c_char::from_ne_bytes([*from]);
    }
    let kvm_chip = kvm_irqchip {
        chip_id: chip.kvm_id(),
        pad: 0,
        chip: kvm_irqchip__bindgen_ty_1 { dummy: raw },
    };
    Ok((chip, kvm_chip))
}

/// Registers one memory slot.
///
/// `region.userspace_addr` must be the start of a mapping of `region.memory_size` bytes that the
/// caller keeps mapped for as long as the VM exists; [`Vm::new`] passes regions of the memory
/// the `Vm` and its vCPUs own.
fn register_slot(
    fd: &VmFd,
    region: kvm_userspace_memory_region,
) -> std::result::Result<(), kvm_ioctls::Error> {
    // SAFETY: `region` describes a region of a `GuestMemoryMmap` mapping: `userspace_addr` is the
    // start of its host mapping and `memory_size` its length. The mapping stays valid while the
    // kernel can use the slot because the `Vm` and every `Vcpu` hold an `Arc` of the memory that
    // they drop only after their file descriptors (see the docs of `Vm`).
    unsafe { fd.set_user_memory_region(region) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memory(ranges: &[(u64, usize)]) -> Arc<GuestMemoryMmap> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(addr, size)| (GuestAddress(addr), size))
            .collect();
        Arc::new(GuestMemoryMmap::from_ranges(&ranges).unwrap())
    }

    #[test]
    fn vm_with_memory_below_and_above_the_gap_is_created() {
        let kvm = Kvm::new().unwrap();
        let vm = Vm::new(&kvm, memory(&[(0, 0x10_0000), (1 << 32, 0x1000)])).unwrap();
        assert!(vm.max_vcpus() >= 1);
        assert_eq!(vm.memory().num_regions(), 2);
        // The in-kernel irqchip exists: its lines accept levels.
        vm.set_irq_line(4, true).unwrap();
        vm.set_irq_line(4, false).unwrap();
        // KVM's signature leaf is among the supported ones.
        assert!(
            vm.supported_cpuid()
                .as_slice()
                .iter()
                .any(|e| e.function == 0x4000_0000)
        );
    }

    #[test]
    fn irqfd_and_ioevent_register_and_unregister() {
        let kvm = Kvm::new().unwrap();
        let vm = Vm::new(&kvm, memory(&[(0, 0x10000)])).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&evt, 5).unwrap();
        vm.unregister_irqfd(&evt, 5).unwrap();
        let addr = IoEventAddress::Mmio(0xd000_0050);
        vm.register_ioevent(&evt, addr, 3u32).unwrap();
        // The same address and value cannot be taken twice.
        assert!(matches!(
            vm.register_ioevent(&evt, addr, 3u32),
            Err(Error::RegisterIoevent(..))
        ));
        vm.unregister_ioevent(&evt, addr, 3u32).unwrap();
    }

    #[test]
    fn memory_stays_alive_while_the_vm_holds_it() {
        let kvm = Kvm::new().unwrap();
        let mem = memory(&[(0, 0x10000)]);
        let vm = Vm::new(&kvm, mem.clone()).unwrap();
        assert_eq!(Arc::strong_count(&mem), 2);
        let keepalive = vm.memory_keepalive();
        assert_eq!(Arc::strong_count(&mem), 3);
        drop(vm);
        assert_eq!(Arc::strong_count(&mem), 2);
        drop(keepalive);
        assert_eq!(Arc::strong_count(&mem), 1);
    }

    #[test]
    fn vm_state_loads_into_a_new_vm() {
        let kvm = Kvm::new().unwrap();
        let source = Vm::new(&kvm, memory(&[(0, 0x10000)])).unwrap();
        // Something to see in each chip: an IRQ line raised on the PICs and the I/O APIC.
        source.set_irq_line(3, true).unwrap();
        let state = source.save_state().unwrap();
        assert_eq!(state.clock.flags, 0);
        assert_eq!(state.pic_master.bytes.len(), IRQCHIP_STATE_SIZE);
        drop(source);

        let target = Vm::new(&kvm, memory(&[(0, 0x10000)])).unwrap();
        target.restore_state(&state).unwrap();
        let restored = target.save_state().unwrap();
        assert_eq!(restored.pic_master, state.pic_master);
        assert_eq!(restored.pic_slave, state.pic_slave);
        assert_eq!(restored.ioapic, state.ioapic);
        // The clock went on from the saved value, not from 0.
        assert!(restored.clock.clock >= state.clock.clock);
        assert_eq!(restored.pit.channels[0].mode, state.pit.channels[0].mode);
    }

    #[test]
    fn vm_state_survives_serialization() {
        let kvm = Kvm::new().unwrap();
        let vm = Vm::new(&kvm, memory(&[(0, 0x10000)])).unwrap();
        let state = vm.save_state().unwrap();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let decoded: VmState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);
    }

    #[test]
    fn vm_state_with_a_truncated_irqchip_is_refused() {
        let kvm = Kvm::new().unwrap();
        let vm = Vm::new(&kvm, memory(&[(0, 0x10000)])).unwrap();
        let mut state = vm.save_state().unwrap();
        state.ioapic.bytes.truncate(100);
        let err = vm.restore_state(&state).unwrap_err();
        assert!(matches!(
            err,
            Error::IrqChipStateSize {
                chip: IrqChip::Ioapic,
                len: 100
            }
        ));
        assert_eq!(
            err.to_string(),
            "The saved state of the I/O APIC has 100 bytes, not 512"
        );
        state.ioapic.bytes = vec![0; 4096];
        assert!(vm.restore_state(&state).is_err());
    }
}
