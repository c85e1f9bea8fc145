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

use std::fmt;
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::cpuid::add_tsc_deadline_timer;
use crate::metrics::VcpuMetrics;

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
}

/// Result type of VM operations.
pub type Result<T> = std::result::Result<T, Error>;

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
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;

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
                flags: 0,
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
        let max_vcpus = kvm.get_max_vcpus();

        Ok(Vm {
            fd,
            supported_cpuid,
            max_vcpus,
            memory,
            vcpu_metrics: Arc::default(),
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

    /// The VM file descriptor, for the vCPUs of this crate only: a vCPU fd created from it must
    /// keep the guest memory alive, which [`Vcpu`](crate::Vcpu) does.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID leaves KVM supports, unfiltered.
    pub(crate) fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
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
}
