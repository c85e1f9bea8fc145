//! One virtual CPU: its architectural setup and the step that turns a KVM exit into an event.
//!
//! [`Vcpu::new`] gives a vCPU the state a Linux guest expects of an x86 CPU at boot: a CPUID
//! with its APIC id and the VM's topology, the boot values of the MSRs the kernel relies on, the
//! local APIC's LINT0 wired to the PIC (ExtINT) and LINT1 to NMI, and an initialized FPU.
//! [`Vcpu::run_once`] enters the guest until the next exit and dispatches port and MMIO accesses
//! to the VMM's [`ExitHandler`]; [`Vcpu::start`](crate::Vcpu::start) runs it on a thread of its
//! own.
//!
//! [`Vcpu::save_state`] reads everything KVM keeps of a vCPU into a [`VcpuState`] (registers,
//! FPU and XSAVE state, local APIC, MSRs, CPUID, pending events, TSC frequency), and
//! [`Vcpu::restore_state`] loads one into a vCPU made by [`Vcpu::new`], in the order KVM needs.

mod state;

pub use state::{FloatingPointState, FpuState, VcpuState};

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use ember_boot::cpu::CpuState;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_fpu, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::bitmap::Bitmap;

use crate::cpuid::vcpu_cpuid;
use crate::exit::ExitHandler;
use crate::metrics::VcpuMetrics;
use crate::regs;
use crate::vm::{MemoryKeepalive, SnapshotCaps, Vm};

/// Errors of vCPU setup and of entering the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VM was asked for with no vCPU.
    #[error("A VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs were asked for than KVM runs in one VM.
    #[error("{count} vCPUs were requested but KVM runs at most {max} in one VM")]
    TooManyVcpus {
        /// vCPUs requested.
        count: usize,
        /// KVM's limit.
        max: usize,
    },
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU index {index} is out of range for a VM of {count} vCPUs")]
    IndexOutOfRange {
        /// The index asked for.
        index: u8,
        /// vCPUs in the VM.
        count: u8,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("Cannot create vCPU {index}")]
    CreateVcpu {
        /// The vCPU index.
        index: u8,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU's CPUID has more leaves than KVM takes.
    #[error("The vCPU's CPUID has too many leaves")]
    CpuidTooLarge(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("Cannot set the vCPU's CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("Cannot set the vCPU's boot MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` stopped at an MSR it does not accept.
    #[error("KVM does not accept the boot value of MSR {index:#x}")]
    MsrRejected {
        /// The MSR that was not set.
        index: u32,
    },
    /// `KVM_GET_LAPIC` failed.
    #[error("Cannot read the vCPU's local APIC")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("Cannot set the vCPU's local APIC")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("Cannot set the vCPU's FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// `KVM_GET_REGS` failed.
    #[error("Cannot read the vCPU's general purpose registers")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("Cannot set the vCPU's general purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_SREGS` failed.
    #[error("Cannot read the vCPU's special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("Cannot set the vCPU's special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MP_STATE` failed.
    #[error("Cannot make the vCPU runnable")]
    SetMpState(#[source] kvm_ioctls::Error),
    /// A `KVM_GET_*` request for a part of the vCPU's state failed.
    #[error("Cannot read the vCPU's {what}")]
    GetState {
        /// The part of the state, as KVM names it (`KVM_GET_...`).
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A `KVM_SET_*` request refused a part of a saved vCPU state.
    #[error("Cannot restore the vCPU's {what}")]
    SetState {
        /// The part of the state, as KVM names it (`KVM_SET_...`).
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved state has no CPUID leaf, or more than KVM takes.
    #[error("The saved vCPU state has {count} CPUID leaves; KVM takes 1 to {max}")]
    CpuidCount {
        /// Leaves in the saved state.
        count: usize,
        /// KVM's limit.
        max: usize,
    },
    /// A saved state has more MSRs than a snapshot holds.
    #[error("The saved vCPU state has {count} MSRs; a snapshot holds at most {max}")]
    MsrCount {
        /// MSRs in the saved state.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A saved state holds an MSR that snapshots do not save.
    #[error("The saved vCPU state holds MSR {index:#x}, which snapshots do not restore")]
    MsrNotRestorable {
        /// The MSR.
        index: u32,
    },
    /// `KVM_SET_MSRS` stopped at an MSR of a saved state.
    #[error("KVM does not accept the saved value of MSR {index:#x}")]
    SavedMsrRejected {
        /// The MSR that was not set.
        index: u32,
    },
    /// A saved XSAVE area is not of a size this host's KVM takes.
    #[error("The saved XSAVE area has {len} bytes; this host's KVM takes {min} to {max}")]
    XsaveSize {
        /// Bytes in the saved state.
        len: usize,
        /// The size of `struct kvm_xsave`.
        min: usize,
        /// The size of KVM's XSAVE area on this host.
        max: usize,
    },
    /// A saved state holds XSAVE state or extended control registers but this host's KVM
    /// takes neither.
    #[error("The saved vCPU state has XSAVE state, which this host's KVM does not take")]
    XsaveUnsupported,
    /// The XSAVE buffer could not be allocated.
    #[error("Cannot allocate the XSAVE buffer")]
    XsaveBuffer(#[source] vmm_sys_util::fam::Error),
    /// The saved CPUID gives the vCPU another APIC id than its index.
    #[error("The saved vCPU state is of the vCPU with APIC id {saved}, not {index}")]
    ApicIdMismatch {
        /// The APIC id in the saved CPUID.
        saved: u32,
        /// The index of the vCPU restored into.
        index: u8,
    },
    /// The saved TSC frequency is not this host's and KVM cannot scale the guest's TSC.
    #[error(
        "The saved vCPU ran its TSC at {saved} kHz; this host runs it at {host} kHz and KVM cannot scale it"
    )]
    TscFrequency {
        /// The saved frequency in kHz.
        saved: u32,
        /// This host's frequency in kHz, or 0 when KVM could not tell it.
        host: u32,
    },
    /// `KVM_RUN` failed other than by being interrupted.
    #[error("Cannot run the vCPU {}", at_rip(*.rip))]
    Run {
        /// The guest instruction pointer, if it could be read.
        rip: Option<u64>,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result type of vCPU operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What a guest asked of the platform through `KVM_EXIT_SYSTEM_EVENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SystemEvent {
    /// Power off.
    Shutdown,
    /// Reset.
    Reset,
    /// The guest crashed and said so.
    Crash,
    /// Another event type, by its KVM number.
    Other(u32),
}

/// What happened when the vCPU last left the guest.
///
/// Port and MMIO accesses have been handled by the time the event is returned: the vCPU's
/// [`ExitHandler`] was given the writes and answered the reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuEvent {
    /// The guest read `len` bytes from I/O port `port`.
    IoIn {
        /// The port.
        port: u16,
        /// Bytes read.
        len: usize,
    },
    /// The guest wrote `len` bytes to I/O port `port`.
    IoOut {
        /// The port.
        port: u16,
        /// Bytes written.
        len: usize,
    },
    /// The guest read `len` bytes at MMIO address `addr`.
    MmioRead {
        /// The guest physical address.
        addr: u64,
        /// Bytes read.
        len: usize,
    },
    /// The guest wrote `len` bytes at MMIO address `addr`.
    MmioWrite {
        /// The guest physical address.
        addr: u64,
        /// Bytes written.
        len: usize,
    },
    /// The guest executed `hlt` and KVM, having no in-kernel local APIC to wait on, returned.
    /// Does not happen with the in-kernel irqchip every [`Vm`] has, where a halted vCPU waits in
    /// the kernel for an interrupt or a kick.
    Hlt,
    /// The vCPU shut down (`KVM_EXIT_SHUTDOWN`), on x86 after a triple fault.
    Shutdown,
    /// The guest asked the platform for a system event.
    SystemEvent(SystemEvent),
    /// KVM met a situation it cannot handle (`KVM_EXIT_INTERNAL_ERROR`), such as an instruction
    /// its emulator does not implement.
    InternalError {
        /// KVM's `KVM_INTERNAL_ERROR_*` code.
        suberror: u32,
        /// The guest instruction pointer when it happened, if it could be read.
        rip: Option<u64>,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// The hardware's entry failure reason.
        reason: u64,
        /// The guest instruction pointer, if it could be read.
        rip: Option<u64>,
    },
    /// KVM left the guest for a reason this crate does not handle.
    Unexpected {
        /// KVM's `KVM_EXIT_*` number.
        exit_reason: u32,
        /// The guest instruction pointer, if it could be read.
        rip: Option<u64>,
    },
    /// `KVM_RUN` was interrupted by a signal or a kick before or while running the guest.
    Interrupted,
}

impl VcpuEvent {
    /// A sentence describing the failure, for the events that mean the vCPU cannot go on because
    /// KVM or the hardware failed; `None` for the others.
    pub fn failure(&self) -> Option<String> {
        match *self {
            VcpuEvent::InternalError { suberror, rip } => Some(match suberror {
                KVM_INTERNAL_ERROR_EMULATION => format!(
                    "KVM could not emulate the instruction {} (emulation failure)",
                    at_rip(rip)
                ),
                KVM_INTERNAL_ERROR_SIMUL_EX => format!(
                    "KVM hit an internal error {} (simultaneous exceptions)",
                    at_rip(rip)
                ),
                KVM_INTERNAL_ERROR_DELIVERY_EV => format!(
                    "KVM hit an internal error {} (failure to deliver an event)",
                    at_rip(rip)
                ),
                KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => format!(
                    "KVM hit an internal error {} (unexpected hardware exit reason)",
                    at_rip(rip)
                ),
                other => format!(
                    "KVM hit an internal error {} (suberror {other})",
                    at_rip(rip)
                ),
            }),
            VcpuEvent::FailEntry { reason, rip } => Some(format!(
                "The hardware could not enter the guest {} (entry failure reason {reason:#x})",
                at_rip(rip)
            )),
            VcpuEvent::Unexpected { exit_reason, rip } => Some(format!(
                "The vCPU left the guest {} for the unhandled KVM exit reason {exit_reason}",
                at_rip(rip)
            )),
            VcpuEvent::SystemEvent(SystemEvent::Crash) => {
                Some("The guest reported a crash".to_string())
            }
            VcpuEvent::SystemEvent(SystemEvent::Other(kind)) => Some(format!(
                "The guest asked for the unsupported system event {kind}"
            )),
            _ => None,
        }
    }
}

/// "at guest RIP 0x..." or a stand-in when the RIP could not be read.
fn at_rip(rip: Option<u64>) -> String {
    match rip {
        Some(rip) => format!("at guest RIP {rip:#x}"),
        None => "at an unknown guest RIP".to_string(),
    }
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` page, which other threads set to make the
/// vCPU's next or current `KVM_RUN` return.
///
/// The page is shared with the kernel, which reads the byte on entry to `KVM_RUN`. This crate
/// writes it only atomically, from the vCPU thread and from threads that kick it; kvm-ioctls
/// reads exit data from the page but never touches this byte.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImmediateExit(NonNull<u8>);

// SAFETY: the pointer is only dereferenced by the `unsafe` methods below, whose callers
// guarantee that the `kvm_run` mapping it points into is still mapped; the accesses are atomic,
// so any thread may make them.
unsafe impl Send for ImmediateExit {}
// SAFETY: as for `Send`: shared use only performs atomic accesses.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn new(fd: &mut VcpuFd) -> Self {
        ImmediateExit(NonNull::from(&mut fd.get_kvm_run().immediate_exit))
    }

    /// Sets the byte to `value`.
    ///
    /// # Safety
    ///
    /// The [`VcpuFd`] this was taken from must not have been dropped: dropping it unmaps the
    /// `kvm_run` page.
    pub(crate) unsafe fn store(self, value: u8) {
        // SAFETY: the caller guarantees the `kvm_run` page is mapped; a `u8` is always aligned;
        // every write to the byte from userspace is this atomic store, and the kernel reads it
        // with READ_ONCE.
        let byte = unsafe { AtomicU8::from_ptr(self.0.as_ptr()) };
        byte.store(value, Ordering::SeqCst);
    }
}

/// Model-specific registers set at boot, with their values.
const BOOT_MSRS: [(u32, u64); 11] = [
    // SYSENTER: no fast system calls until the kernel sets them up.
    (0x174, 0), // IA32_SYSENTER_CS
    (0x175, 0), // IA32_SYSENTER_ESP
    (0x176, 0), // IA32_SYSENTER_EIP
    // SYSCALL targets and masks.
    (0xc000_0081, 0), // STAR
    (0xc000_0082, 0), // LSTAR
    (0xc000_0083, 0), // CSTAR
    (0xc000_0102, 0), // KERNEL_GS_BASE
    (0xc000_0084, 0), // SYSCALL_MASK
    // KVM takes a write of 0 from the VMM as the request to keep this vCPU's TSC in step with
    // the VM's other vCPUs.
    (0x10, 0), // IA32_TSC
    // Fast string operations enabled, as firmware leaves them.
    (0x1a0, 1), // IA32_MISC_ENABLE
    // MTRRs enabled with write-back as the default memory type.
    (0x2ff, (1 << 11) | 6), // IA32_MTRR_DEF_TYPE
];

/// Local APIC register offsets of the LINT0 and LINT1 local vector table entries.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode field of a local vector table entry (bits 10:8) and the modes ember uses.
const APIC_LVT_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_DELIVERY_MODE_NMI: u32 = 0x4 << 8;
const APIC_DELIVERY_MODE_EXTINT: u32 = 0x7 << 8;

/// x87 control word after `FNINIT`: all exceptions masked, 64-bit precision, round to nearest.
const FPU_FCW_INIT: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked, round to nearest.
const FPU_MXCSR_INIT: u32 = 0x1f80;

/// One KVM virtual CPU, wired to the handler of its port and MMIO accesses.
pub struct Vcpu {
    /// The vCPU file descriptor and its `kvm_run` mapping. Declared first, and so dropped
    /// before `_memory`: see the docs of [`Vm`].
    fd: VcpuFd,
    /// Points into the `kvm_run` mapping of `fd`.
    immediate_exit: ImmediateExit,
    index: u8,
    /// Where port and MMIO accesses go.
    handler: Arc<dyn ExitHandler>,
    /// The VM's exit counters, shared by its vCPUs.
    metrics: Arc<VcpuMetrics>,
    /// What KVM offers for saving and restoring the vCPU.
    caps: Arc<SnapshotCaps>,
    /// Keeps the guest memory mapped while `fd`, which holds the VM and its memory slots alive
    /// in the kernel, is open.
    _memory: MemoryKeepalive,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU `index` of a VM that will have `count` vCPUs, with its CPUID, boot MSRs,
    /// local APIC LINT pins and FPU set up. Port accesses and the MMIO accesses that KVM does
    /// not handle itself (it handles the APICs and the IOAPIC) go to `handler`.
    ///
    /// The vCPU's APIC id is `index`. vCPU 0 is the bootstrap processor; the others wait for the
    /// INIT-SIPI sequence of the bootstrap processor unless given a
    /// [`set_boot_state`](Vcpu::set_boot_state).
    ///
    /// # Errors
    ///
    /// [`Error::NoVcpus`] when `count` is 0, [`Error::TooManyVcpus`] when it exceeds
    /// [`Vm::max_vcpus`], [`Error::IndexOutOfRange`] when `index` is not below it, and the
    /// variant naming the failed KVM request otherwise.
    pub fn new<B: Bitmap + Send + Sync + 'static>(
        vm: &Vm<B>,
        index: u8,
        count: u8,
        handler: Arc<dyn ExitHandler>,
    ) -> Result<Self> {
        check_vcpu_count(count, vm.max_vcpus())?;
        if index >= count {
            return Err(Error::IndexOutOfRange { index, count });
        }
        // Declared before `fd`, so that an early return drops it after `fd`.
        let memory = vm.memory_keepalive();
        let mut fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| Error::CreateVcpu { index, source })?;

        let cpuid = vcpu_cpuid(vm.supported_cpuid(), index, count).map_err(Error::CpuidTooLarge)?;
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        set_boot_msrs(&fd)?;
        set_lint_pins(&fd)?;
        let fpu = kvm_fpu {
            fcw: FPU_FCW_INIT,
            mxcsr: FPU_MXCSR_INIT,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(Error::SetFpu)?;

        let immediate_exit = ImmediateExit::new(&mut fd);
        Ok(Vcpu {
            fd,
            immediate_exit,
            index,
            handler,
            metrics: vm.vcpu_metrics().clone(),
            caps: vm.snapshot_caps().clone(),
            _memory: memory,
        })
    }

    /// The vCPU's index, which is also its APIC id.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Loads `state` into the vCPU and makes it runnable: the registers [`CpuState`] names are
    /// set, other general purpose registers are zeroed, and CR2, CR8, the APIC base and pending
    /// interrupts keep what KVM holds. The reserved RFLAGS bit 1 is always set.
    ///
    /// Meant for the bootstrap processor; on another vCPU it starts that vCPU at `state` without
    /// waiting for INIT-SIPI.
    ///
    /// # Errors
    ///
    /// The variant naming the failed KVM request.
    pub fn set_boot_state(&self, state: &CpuState) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(Error::GetSregs)?;
        regs::apply_special_registers(&mut sregs, &state.sregs);
        self.fd.set_sregs(&sregs).map_err(Error::SetSregs)?;
        self.fd
            .set_regs(&regs::kvm_regs_from(&state.regs))
            .map_err(Error::SetRegs)?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(Error::SetMpState)
    }

    /// Reads the registers [`CpuState`] names. On a vCPU that has not run yet this is the x86
    /// reset state, a starting point for [`Vcpu::set_boot_state`].
    ///
    /// # Errors
    ///
    /// The variant naming the failed KVM request.
    pub fn cpu_state(&self) -> Result<CpuState> {
        let regs = self.fd.get_regs().map_err(Error::GetRegs)?;
        let sregs = self.fd.get_sregs().map_err(Error::GetSregs)?;
        Ok(regs::cpu_state_from(&regs, &sregs))
    }

    /// Runs the guest until its next exit to userspace and handles that exit: port and MMIO
    /// accesses are dispatched to the [`ExitHandler`], everything else is described by the
    /// returned event. Each exit is counted in the VM's [`VcpuMetrics`].
    ///
    /// # Errors
    ///
    /// [`Error::Run`] when `KVM_RUN` fails for a reason other than a signal or a kick, which
    /// give [`VcpuEvent::Interrupted`].
    pub fn run_once(&mut self) -> Result<VcpuEvent> {
        let outcome = self.run_and_handle();
        let metrics = &self.metrics;
        match &outcome {
            Ok(VcpuEvent::IoIn { .. }) => metrics.exit_io_in.inc(),
            Ok(VcpuEvent::IoOut { .. }) => metrics.exit_io_out.inc(),
            Ok(VcpuEvent::MmioRead { .. }) => metrics.exit_mmio_read.inc(),
            Ok(VcpuEvent::MmioWrite { .. }) => metrics.exit_mmio_write.inc(),
            Ok(VcpuEvent::Interrupted) => metrics.exit_interrupted.inc(),
            Ok(VcpuEvent::Hlt | VcpuEvent::Shutdown | VcpuEvent::SystemEvent(_)) => {
                metrics.exit_system.inc()
            }
            Ok(_) | Err(_) => metrics.failures.inc(),
        }
        outcome
    }

    fn run_and_handle(&mut self) -> Result<VcpuEvent> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(err) if matches!(err.errno(), libc::EINTR | libc::EAGAIN) => {
                // SAFETY: `self.fd`, which maps the byte, is alive.
                unsafe { self.immediate_exit.store(0) };
                return Ok(VcpuEvent::Interrupted);
            }
            Err(source) => {
                return Err(Error::Run {
                    rip: self.rip(),
                    source,
                });
            }
        };
        let handler = &*self.handler;
        let event = match exit {
            VcpuExit::IoIn(port, data) => {
                // The page holds what an earlier exit left there: the handler starts from zeros.
                data.fill(0);
                handler.pio_read(port, data);
                VcpuEvent::IoIn {
                    port,
                    len: data.len(),
                }
            }
            VcpuExit::IoOut(port, data) => {
                handler.pio_write(port, data);
                VcpuEvent::IoOut {
                    port,
                    len: data.len(),
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0);
                handler.mmio_read(addr, data);
                VcpuEvent::MmioRead {
                    addr,
                    len: data.len(),
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                handler.mmio_write(addr, data);
                VcpuEvent::MmioWrite {
                    addr,
                    len: data.len(),
                }
            }
            VcpuExit::Hlt => VcpuEvent::Hlt,
            VcpuExit::Shutdown => VcpuEvent::Shutdown,
            VcpuExit::SystemEvent(kind, _) => VcpuEvent::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }),
            VcpuExit::InternalError => {
                let suberror = self.internal_error_code();
                VcpuEvent::InternalError {
                    suberror,
                    rip: self.rip(),
                }
            }
            VcpuExit::FailEntry(reason, _cpu) => VcpuEvent::FailEntry {
                reason,
                rip: self.rip(),
            },
            _ => VcpuEvent::Unexpected {
                exit_reason: self.fd.get_kvm_run().exit_reason,
                rip: self.rip(),
            },
        };
        Ok(event)
    }

    /// The `immediate_exit` byte of this vCPU, valid while the vCPU is alive.
    pub(crate) fn immediate_exit(&self) -> ImmediateExit {
        self.immediate_exit
    }

    /// The suberror of the `KVM_EXIT_INTERNAL_ERROR` exit that `run` just returned.
    fn internal_error_code(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM set `exit_reason` to KVM_EXIT_INTERNAL_ERROR, for which `internal` is the
        // union member it filled in; the member is plain integers, valid for any bytes.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// The guest instruction pointer, or `None` when it cannot be read.
    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|regs| regs.rip)
    }

    /// Where the vCPU stands, on one line for a log: the instruction and stack pointers, the
    /// control registers (CR2 is the address of the last page fault), the descriptor tables and
    /// the event KVM was delivering. After a triple fault ([`VcpuEvent::Shutdown`]) this is
    /// what tells where the guest was when its exception handling failed, on Intel hosts. On
    /// AMD hosts KVM puts the vCPU through INIT at a shutdown (the VMCB is undefined after
    /// one), so the registers read are the reset state (`rip=0xfff0`) and only the vectors of
    /// the last exception and interrupt KVM delivered are left of the fault. A register KVM
    /// cannot read is left out and the line says so.
    pub fn fault_report(&self) -> String {
        let mut line = String::new();
        match self.fd.get_regs() {
            Ok(r) => line.push_str(&format!(
                "rip={:#x} rsp={:#x} rbp={:#x} rflags={:#x} rax={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rdi
            )),
            Err(err) => line.push_str(&format!("registers unreadable ({err})")),
        }
        match self.fd.get_sregs() {
            Ok(s) => line.push_str(&format!(
                " cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} \
                 gdt={:#x}/{:#x} idt={:#x}/{:#x} tr={:#x}@{:#x}",
                s.cs.selector,
                s.ss.selector,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.gdt.base,
                s.gdt.limit,
                s.idt.base,
                s.idt.limit,
                s.tr.selector,
                s.tr.base
            )),
            Err(err) => line.push_str(&format!(" special registers unreadable ({err})")),
        }
        match self.fd.get_vcpu_events() {
            Ok(e) => line.push_str(&format!(
                " exception={}:{}:{:#x} interrupt={}:{} nmi={}",
                e.exception.injected,
                e.exception.nr,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected
            )),
            Err(err) => line.push_str(&format!(" events unreadable ({err})")),
        }
        line
    }
}

/// Checks a VM's vCPU count against KVM's limit.
pub(crate) fn check_vcpu_count(count: u8, max: usize) -> Result<()> {
    let count = usize::from(count);
    if count == 0 {
        return Err(Error::NoVcpus);
    }
    if count > max {
        return Err(Error::TooManyVcpus { count, max });
    }
    Ok(())
}

/// Sets [`BOOT_MSRS`].
fn set_boot_msrs(fd: &VcpuFd) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // Cannot fail: BOOT_MSRS is far below KVM_MAX_MSR_ENTRIES.
    let msrs = Msrs::from_entries(&entries).expect("the boot MSRs fit in a kvm_msrs");
    let set = fd.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    match entries.get(set) {
        // KVM stops at the first MSR it refuses and returns how many it set.
        Some(refused) => Err(Error::MsrRejected {
            index: refused.index,
        }),
        None => Ok(()),
    }
}

/// Wires the local APIC's LINT0 to the PIC (ExtINT) and LINT1 to NMI, as firmware does for the
/// virtual wire mode Linux expects to find.
fn set_lint_pins(fd: &VcpuFd) -> Result<()> {
    let mut lapic = fd.get_lapic().map_err(Error::GetLapic)?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_MODE_NMI),
    ] {
        let value = lapic_register(&lapic, offset);
        set_lapic_register(
            &mut lapic,
            offset,
            (value & !APIC_LVT_DELIVERY_MODE_MASK) | mode,
        );
    }
    fd.set_lapic(&lapic).map_err(Error::SetLapic)
}

/// Reads the 32-bit local APIC register at `offset` (a constant of this module, in bounds).
fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (byte, reg) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *byte = reg.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit local APIC register at `offset` (a constant of this module, in bounds).
fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (reg, byte) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *reg = std::os::raw::c_char::from_ne_bytes([byte]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn vm() -> Vm {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        Vm::new(&Kvm::new().unwrap(), Arc::new(memory)).unwrap()
    }

    /// Answers nothing: these tests never run the guest.
    struct NoDevices;

    impl ExitHandler for NoDevices {
        fn pio_read(&self, _: u16, _: &mut [u8]) {}
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_read(&self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    fn vcpu(vm: &Vm, index: u8, count: u8) -> Vcpu {
        Vcpu::new(vm, index, count, Arc::new(NoDevices)).unwrap()
    }

    #[test]
    fn new_vcpu_has_the_boot_msrs() {
        let vm = vm();
        let vcpu = vcpu(&vm, 0, 1);
        let entries: Vec<_> = BOOT_MSRS
            .iter()
            .map(|&(index, _)| kvm_msr_entry {
                index,
                data: 0xdead,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).unwrap();
        assert_eq!(vcpu.fd.get_msrs(&mut msrs).unwrap(), BOOT_MSRS.len());
        for (read, &(index, value)) in msrs.as_slice().iter().zip(&BOOT_MSRS) {
            assert_eq!(read.index, index);
            // KVM takes a host write of 0 to the TSC as "synchronize with the other vCPUs",
            // so its value is the VM's clock, not 0.
            if index != 0x10 {
                assert_eq!(read.data, value, "MSR {index:#x}");
            }
        }
    }

    #[test]
    fn new_vcpu_has_lint_pins_wired_and_fpu_initialized() {
        let vm = vm();
        let vcpu = vcpu(&vm, 0, 1);
        let lapic = vcpu.fd.get_lapic().unwrap();
        assert_eq!(
            lapic_register(&lapic, APIC_LVT_LINT0) & APIC_LVT_DELIVERY_MODE_MASK,
            APIC_DELIVERY_MODE_EXTINT
        );
        assert_eq!(
            lapic_register(&lapic, APIC_LVT_LINT1) & APIC_LVT_DELIVERY_MODE_MASK,
            APIC_DELIVERY_MODE_NMI
        );
        // The legacy region of the XSAVE area: FCW in the first word, MXCSR at byte 24.
        // (`KVM_GET_FPU` does not report MXCSR on every host.)
        let xsave = vcpu.fd.get_xsave().unwrap();
        assert_eq!(xsave.region[0] & 0xffff, u32::from(FPU_FCW_INIT));
        assert_eq!(xsave.region[6], FPU_MXCSR_INIT);
    }

    #[test]
    fn new_vcpu_has_its_own_cpuid() {
        let vm = vm();
        let vcpus = [vcpu(&vm, 0, 3), vcpu(&vm, 1, 3), vcpu(&vm, 2, 3)];
        for vcpu in &vcpus {
            let cpuid = vcpu
                .fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(vcpu.index()));
            assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
            assert!(
                cpuid
                    .as_slice()
                    .iter()
                    .any(|e| e.function == 0x4000_0000 && e.ebx == 0x4b4d_564b),
                "KVM signature"
            );
        }
    }

    #[test]
    fn reset_state_of_a_new_vcpu_is_real_mode() {
        let vm = vm();
        let state = vcpu(&vm, 0, 1).cpu_state().unwrap();
        assert_eq!(state.regs.rip, 0xfff0);
        assert_eq!(state.sregs.cs.selector, 0xf000);
        assert_eq!(state.sregs.cr0 & 1, 0, "protection disabled");
    }

    #[test]
    fn vcpu_count_is_checked_against_zero_and_the_kvm_limit() {
        assert!(matches!(check_vcpu_count(0, 8), Err(Error::NoVcpus)));
        assert!(matches!(
            check_vcpu_count(9, 8),
            Err(Error::TooManyVcpus { count: 9, max: 8 })
        ));
        check_vcpu_count(8, 8).unwrap();
        check_vcpu_count(1, 8).unwrap();
        assert_eq!(
            check_vcpu_count(255, 254).unwrap_err().to_string(),
            "255 vCPUs were requested but KVM runs at most 254 in one VM"
        );
    }

    #[test]
    fn failures_name_the_cause_and_the_rip() {
        let emulation = VcpuEvent::InternalError {
            suberror: KVM_INTERNAL_ERROR_EMULATION,
            rip: Some(0x100_0003),
        };
        assert_eq!(
            emulation.failure().unwrap(),
            "KVM could not emulate the instruction at guest RIP 0x1000003 (emulation failure)"
        );
        let unknown_rip = VcpuEvent::InternalError {
            suberror: 77,
            rip: None,
        };
        assert_eq!(
            unknown_rip.failure().unwrap(),
            "KVM hit an internal error at an unknown guest RIP (suberror 77)"
        );
        let entry = VcpuEvent::FailEntry {
            reason: 0x21,
            rip: Some(0xfff0),
        };
        assert!(entry.failure().unwrap().contains("0xfff0"));
        assert!(entry.failure().unwrap().contains("0x21"));
        for benign in [
            VcpuEvent::IoOut {
                port: 0x3f8,
                len: 1,
            },
            VcpuEvent::Shutdown,
            VcpuEvent::SystemEvent(SystemEvent::Reset),
            VcpuEvent::Interrupted,
        ] {
            assert_eq!(benign.failure(), None, "{benign:?}");
        }
    }

    #[test]
    fn lapic_registers_are_little_endian_words() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_register(&mut lapic, APIC_LVT_LINT0, 0x0001_0700);
        assert_eq!(lapic.regs[APIC_LVT_LINT0], 0);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 1], 7);
        assert_eq!(lapic.regs[APIC_LVT_LINT0 + 2], 1);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        set_lapic_register(&mut lapic, APIC_LVT_LINT1, 0xffff_ffff);
        assert_eq!(lapic_register(&lapic, APIC_LVT_LINT1), 0xffff_ffff);
    }
}
