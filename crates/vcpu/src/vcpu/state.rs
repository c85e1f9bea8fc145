//! Saving a vCPU's state and loading it into another vCPU.
//!
//! The order of the KVM requests matters, both ways:
//!
//! - saving starts with `KVM_GET_MP_STATE`, which lets KVM deliver pending INIT and SIPI
//!   events and may change the local APIC and the registers; it ends with
//!   `KVM_GET_VCPU_EVENTS`, so that the pending exception and interrupt it reports are the
//!   ones the other requests left;
//! - restoring sets the TSC frequency and the CPUID first (KVM derives what the vCPU may do from
//!   the CPUID); the special registers before the local APIC (they hold the APIC base); the
//!   local APIC before the MSRs (the TSC deadline only takes with the APIC timer set up); the
//!   TSC before the TSC deadline; the general purpose registers before the vCPU events
//!   (`KVM_SET_REGS` drops a pending exception, which `KVM_SET_VCPU_EVENTS` brings back).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, Xsave, kvm_cpuid_entry2,
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

use super::{Error, Result, Vcpu};
use crate::msr::{MSR_IA32_TSC_DEADLINE, is_saved};

/// The most MSRs a saved state may hold.
pub const MAX_SAVED_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;

/// Words of `struct kvm_xsave` without its flexible array.
const XSAVE_REGION_WORDS: usize = 1024;

/// Tolerance on a saved TSC frequency, in parts per million: two hosts of one CPU model
/// calibrate their TSC a little differently at boot.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// Everything KVM keeps of one vCPU, as [`Vcpu::save_state`] read it.
///
/// The KVM structures are serialized as their bytes. A state read from a file is untrusted:
/// [`Vcpu::restore_state`] checks counts, sizes and MSR indices before it loads anything, and
/// KVM checks the values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VcpuState {
    /// The CPUID the guest saw (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The MSRs worth saving that KVM could read, in KVM's order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Running, halted or waiting for INIT-SIPI (`KVM_GET_MP_STATE`).
    pub mp_state: kvm_mp_state,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER and the APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended (AVX and later) state.
    pub fpu: FloatingPointState,
    /// The extended control registers (XCR0), where KVM has them (`KVM_CAP_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs and SMIs (`KVM_GET_VCPU_EVENTS`).
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency in kHz, where KVM could tell it.
    pub tsc_khz: Option<u32>,
}

/// The floating point and vector state of a vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FloatingPointState {
    /// The XSAVE area (`KVM_GET_XSAVE`, or `KVM_GET_XSAVE2` where it is larger than 4096
    /// bytes), as 32-bit words.
    Xsave(Vec<u32>),
    /// The legacy FPU and SSE state, on a host whose KVM has no XSAVE.
    Fpu(Box<FpuState>),
}

/// x87 and SSE state, as `KVM_GET_FPU` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// The eight x87 registers, in 16-byte slots.
    pub fpr: [[u8; 16]; 8],
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged x87 tag word.
    pub ftwx: u8,
    /// Opcode of the last x87 instruction.
    pub last_opcode: u16,
    /// Address of the last x87 instruction.
    pub last_ip: u64,
    /// Address of the last x87 operand.
    pub last_dp: u64,
    /// The sixteen SSE registers.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(fpu: &kvm_fpu) -> Self {
        FpuState {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(fpu: &FpuState) -> Self {
        kvm_fpu {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        }
    }
}

/// `KVM_GET_*` failed for `what`.
fn get(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::GetState { what, source }
}

/// `KVM_SET_*` failed for `what`.
fn set(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::SetState { what, source }
}

impl Vcpu {
    /// Reads the vCPU's state. For a state that the guest can go on from, every vCPU of the VM
    /// must be out of the guest (paused) while their states are saved.
    ///
    /// It takes `&mut self` because it first completes the port or MMIO access of the last exit,
    /// as KVM requires before the state is read: the register that an `in` reads into, for
    /// example, is written when the vCPU next enters `KVM_RUN`. It does so with a `KVM_RUN` that
    /// returns at once, without running the guest.
    ///
    /// # Errors
    ///
    /// [`Error::GetState`] naming the KVM request that failed, [`Error::Run`] when the access
    /// could not be completed.
    pub fn save_state(&mut self) -> Result<VcpuState> {
        self.complete_pending_exit()?;
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(get("MP state"))?;
        let regs = fd.get_regs().map_err(get("general purpose registers"))?;
        let sregs = fd.get_sregs().map_err(get("special registers"))?;
        let fpu = self.floating_point_state()?;
        let xcrs = match self.caps.xcrs {
            true => Some(fd.get_xcrs().map_err(get("extended control registers"))?),
            false => None,
        };
        let debug_regs = fd.get_debug_regs().map_err(get("debug registers"))?;
        let lapic = fd.get_lapic().map_err(get("local APIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = self.cpuid()?;
        let msrs = self.saved_msrs()?;
        let vcpu_events = fd.get_vcpu_events().map_err(get("pending events"))?;
        Ok(VcpuState {
            cpuid,
            msrs,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Loads `state` into this vCPU, made by [`Vcpu::new`] and not run yet: its CPUID, MSRs and
    /// everything else become the saved ones. Where the saved TSC frequency is not this host's,
    /// KVM is asked to run the guest's TSC at the saved one.
    ///
    /// The saved state is checked before anything is loaded. [`Vcpu::check_compatible`] tells
    /// whether this host has the CPU features the saved CPUID offers; this method does not.
    ///
    /// # Errors
    ///
    /// [`Error::CpuidCount`], [`Error::MsrCount`], [`Error::MsrNotRestorable`],
    /// [`Error::XsaveSize`], [`Error::XsaveUnsupported`] and [`Error::ApicIdMismatch`] for a
    /// state this vCPU cannot take; [`Error::TscFrequency`] when the TSC frequencies differ
    /// and KVM cannot scale; [`Error::SetState`] or [`Error::SavedMsrRejected`] naming what KVM
    /// refused.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let cpuid = self.check_state(state)?;
        let fd = &self.fd;
        if let Some(saved) = state.tsc_khz {
            self.set_tsc_khz(saved)?;
        }
        fd.set_cpuid2(&cpuid).map_err(Error::SetCpuid)?;
        fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
        fd.set_regs(&state.regs)
            .map_err(set("general purpose registers"))?;
        fd.set_sregs(&state.sregs)
            .map_err(set("special registers"))?;
        self.set_floating_point_state(&state.fpu)?;
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs)
                .map_err(set("extended control registers"))?;
        }
        fd.set_debug_regs(&state.debug_regs)
            .map_err(set("debug registers"))?;
        fd.set_lapic(&state.lapic).map_err(set("local APIC"))?;
        let (deferred, first): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = state
            .msrs
            .iter()
            .partition(|msr| msr.index == MSR_IA32_TSC_DEADLINE);
        self.set_saved_msrs(&first)?;
        self.set_saved_msrs(&deferred)?;
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(set("pending events"))?;
        // The guest was stopped for as long as the snapshot took: tell its kvmclock.
        self.notify_guest_paused();
        Ok(())
    }

    /// Completes the access of the last exit with a `KVM_RUN` that leaves before entering the
    /// guest (`immediate_exit` set). An access that needs another exit to complete (a string
    /// instruction) is handled like any other, at most a few times.
    fn complete_pending_exit(&mut self) -> Result<()> {
        const MAX_EXITS: usize = 64;
        for _ in 0..MAX_EXITS {
            // SAFETY: `self.fd`, which maps the byte, is alive.
            unsafe { self.immediate_exit.store(1) };
            match self.run_and_handle()? {
                super::VcpuEvent::Interrupted => return Ok(()),
                event => log::debug!(
                    "vCPU {}: completing the last exit before a save gave {event:?}",
                    self.index
                ),
            }
        }
        // SAFETY: as above.
        unsafe { self.immediate_exit.store(0) };
        Ok(())
    }

    /// Tells a guest with kvmclock that it was paused (`KVM_KVMCLOCK_CTRL`), so that its
    /// soft-lockup watchdog does not take the time it did not run for a hang. A guest without
    /// kvmclock makes KVM answer `EINVAL`, which is fine; other failures are logged.
    pub(crate) fn notify_guest_paused(&self) {
        if let Err(err) = self.fd.kvmclock_ctrl() {
            if err.errno() != libc::EINVAL {
                log::warn!("vCPU {}: KVM_KVMCLOCK_CTRL failed: {err}", self.index);
            }
        }
    }

    /// Checks what this vCPU cannot take of `state`, before anything is loaded; returns the
    /// CPUID to set.
    fn check_state(&self, state: &VcpuState) -> Result<CpuId> {
        let count = state.cpuid.len();
        if count == 0 || count > KVM_MAX_CPUID_ENTRIES {
            return Err(Error::CpuidCount {
                count,
                max: KVM_MAX_CPUID_ENTRIES,
            });
        }
        if let Some(leaf1) = state.cpuid.iter().find(|e| e.function == 1 && e.index == 0) {
            let saved = leaf1.ebx >> 24;
            if saved != u32::from(self.index) {
                return Err(Error::ApicIdMismatch {
                    saved,
                    index: self.index,
                });
            }
        }
        let count = state.msrs.len();
        if count > MAX_SAVED_MSRS {
            return Err(Error::MsrCount {
                count,
                max: MAX_SAVED_MSRS,
            });
        }
        if let Some(msr) = state.msrs.iter().find(|msr| !is_saved(msr.index)) {
            return Err(Error::MsrNotRestorable { index: msr.index });
        }
        match (&state.fpu, self.caps.xsave_size) {
            (FloatingPointState::Xsave(words), Some(max)) => {
                let len = words.len().saturating_mul(4);
                let min = std::mem::size_of::<kvm_xsave>();
                if len < min || len > max {
                    return Err(Error::XsaveSize { len, min, max });
                }
            }
            (FloatingPointState::Xsave(_), None) => return Err(Error::XsaveUnsupported),
            (FloatingPointState::Fpu(_), _) => {}
        }
        if state.xcrs.is_some() && !self.caps.xcrs {
            return Err(Error::XsaveUnsupported);
        }
        CpuId::from_entries(&state.cpuid).map_err(Error::CpuidTooLarge)
    }

    /// Runs the guest's TSC at `saved` kHz, unless this host's is within the tolerance of it.
    fn set_tsc_khz(&self, saved: u32) -> Result<()> {
        let host = self.fd.get_tsc_khz().ok();
        if let Some(host) = host {
            let diff = u64::from(host.abs_diff(saved));
            if diff.saturating_mul(1_000_000) <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
                return Ok(());
            }
        }
        if !self.caps.tsc_control {
            return Err(Error::TscFrequency {
                saved,
                host: host.unwrap_or(0),
            });
        }
        self.fd.set_tsc_khz(saved).map_err(set("TSC frequency"))
    }

    /// The vCPU's CPUID, without the zeroed entries some kernels leave after the last leaf.
    fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        self.kvm_cpuid().map_err(get("CPUID"))
    }

    /// As [`cpuid`](Self::cpuid), with KVM's error.
    pub(crate) fn kvm_cpuid(
        &self,
    ) -> std::result::Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?;
        Ok(cpuid
            .as_slice()
            .iter()
            .filter(|e| *e != &kvm_cpuid_entry2::default())
            .copied()
            .collect())
    }

    /// Reads the MSRs worth saving. One that KVM lists but will not read for this vCPU (its
    /// feature is not in the CPUID) is left out.
    fn saved_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        let mut saved = Vec::with_capacity(self.caps.msrs_to_save.len());
        let mut pending: &[u32] = &self.caps.msrs_to_save;
        while !pending.is_empty() {
            let chunk = &pending[..pending.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrCount {
                count: entries.len(),
                max: KVM_MAX_MSR_ENTRIES,
            })?;
            let read = self.fd.get_msrs(&mut msrs).map_err(get("MSRs"))?;
            let read = read.min(chunk.len());
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            // KVM stops at the first MSR it cannot read: skip it and go on after it.
            let next = if read < chunk.len() {
                log::debug!(
                    "vCPU {}: MSR {:#x} cannot be read and is not saved",
                    self.index,
                    chunk[read]
                );
                read + 1
            } else {
                read
            };
            pending = &pending[next..];
        }
        Ok(saved)
    }

    /// Sets saved MSRs, in chunks KVM takes.
    fn set_saved_msrs(&self, entries: &[kvm_msr_entry]) -> Result<()> {
        for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| Error::MsrCount {
                count: chunk.len(),
                max: KVM_MAX_MSR_ENTRIES,
            })?;
            let set = self.fd.set_msrs(&msrs).map_err(set("MSRs"))?;
            if let Some(refused) = chunk.get(set) {
                return Err(Error::SavedMsrRejected {
                    index: refused.index,
                });
            }
        }
        Ok(())
    }

    /// Reads the XSAVE area, or the FPU where KVM has no XSAVE.
    fn floating_point_state(&self) -> Result<FloatingPointState> {
        let Some(size) = self.caps.xsave_size else {
            let fpu = self.fd.get_fpu().map_err(get("FPU"))?;
            return Ok(FloatingPointState::Fpu(Box::new(FpuState::from(&fpu))));
        };
        let extra = extra_words(size);
        if extra == 0 {
            let xsave = self.fd.get_xsave().map_err(get("XSAVE area"))?;
            return Ok(FloatingPointState::Xsave(xsave.region.to_vec()));
        }
        let mut xsave = Xsave::new(extra).map_err(Error::XsaveBuffer)?;
        // SAFETY: `xsave` has room for `size` bytes, the size KVM_CAP_XSAVE2 reported for this
        // VM, which is what KVM_GET_XSAVE2 writes.
        unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(get("XSAVE area"))?;
        let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(FloatingPointState::Xsave(words))
    }

    /// Loads the XSAVE area or the FPU; `check_state` checked the size of the area.
    fn set_floating_point_state(&self, state: &FloatingPointState) -> Result<()> {
        let words = match state {
            FloatingPointState::Fpu(fpu) => {
                return self.fd.set_fpu(&kvm_fpu::from(&**fpu)).map_err(set("FPU"));
            }
            FloatingPointState::Xsave(words) => words,
        };
        let size = self.caps.xsave_size.ok_or(Error::XsaveUnsupported)?;
        let mut xsave = Xsave::new(extra_words(size)).map_err(Error::XsaveBuffer)?;
        let (region, extra) = words.split_at(words.len().min(XSAVE_REGION_WORDS));
        // SAFETY: only the words of the area are written; the length stays what `new` set.
        let area = unsafe { xsave.as_mut_fam_struct() };
        for (to, from) in area.xsave.region.iter_mut().zip(region) {
            *to = *from;
        }
        for (to, from) in xsave.as_mut_slice().iter_mut().zip(extra) {
            *to = *from;
        }
        // SAFETY: `xsave` holds `size` bytes or more, the size KVM_CAP_XSAVE2 reported for this
        // VM (4096 where KVM lacks the capability), which is what KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(set("XSAVE area"))
    }
}

/// Words of the flexible array after `struct kvm_xsave` in an XSAVE area of `size` bytes.
fn extra_words(size: usize) -> usize {
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<
            <kvm_bindings::kvm_xsave2 as FamStruct>::Entry,
        >())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_converts_to_and_from_kvm_fpu() {
        let fpu = kvm_fpu {
            fpr: [[7; 16]; 8],
            fcw: 0x37f,
            fsw: 0x20,
            ftwx: 0x80,
            last_opcode: 0x1d9,
            last_ip: 0x1234,
            last_dp: 0x5678,
            xmm: [[9; 16]; 16],
            mxcsr: 0x1f80,
            ..Default::default()
        };
        let state = FpuState::from(&fpu);
        assert_eq!(kvm_fpu::from(&state), fpu);
    }

    #[test]
    fn xsave_extra_words_round_up() {
        assert_eq!(extra_words(4096), 0);
        assert_eq!(extra_words(4097), 1);
        assert_eq!(extra_words(4096 + 8192), 2048);
    }
}
