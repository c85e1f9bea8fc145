//! The model-specific registers a vCPU snapshot holds.
//!
//! KVM lists the MSRs it saves and restores (`KVM_GET_MSR_INDEX_LIST`); a snapshot keeps those
//! of them that hold guest state a Linux guest relies on, listed in [`SAVED_MSR_RANGES`]. The
//! others are left out: performance counters (ember exposes no PMU), nested virtualization
//! capabilities, read-only feature MSRs, which the CPUID and KVM set anew, and
//! `IA32_FEATURE_CONTROL` and `IA32_MCG_CTL`, which Linux does not let a VMM restore.

/// `IA32_TSC`.
pub(crate) const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: restored after `IA32_TSC` and the local APIC, or KVM may arm the APIC
/// timer against the wrong TSC and a timer interrupt is lost.
pub(crate) const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Ranges of MSRs a snapshot holds: (first index, count).
const SAVED_MSR_RANGES: [(u32, u32); 19] = [
    (MSR_IA32_TSC, 1),
    // KVM's first paravirtual clock MSRs (wall clock, system time).
    (0x11, 2),
    (0x3b, 1),  // IA32_TSC_ADJUST
    (0x48, 1),  // IA32_SPEC_CTRL
    (0x122, 1), // IA32_TSX_CTRL
    (0x140, 1), // MISC_FEATURE_ENABLES
    // IA32_SYSENTER_CS, _ESP, _EIP.
    (0x174, 3),
    (0x17a, 1), // IA32_MCG_STATUS
    (0x1a0, 1), // IA32_MISC_ENABLE
    // The MTRRs, IA32_PAT (0x277) and IA32_MTRR_DEF_TYPE (0x2ff).
    (0x200, 0x100),
    // The machine-check banks.
    (0x400, 0x80),
    (MSR_IA32_TSC_DEADLINE, 1),
    (0xd90, 1), // IA32_BNDCFGS
    (0xda0, 1), // IA32_XSS
    // KVM's paravirtual MSRs: wall clock, system time, async page faults, steal time, PV EOI,
    // poll control, async page fault interrupt and acknowledgement.
    (0x4b56_4d00, 8),
    // EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK.
    (0xc000_0080, 5),
    // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX.
    (0xc000_0100, 4),
    (0xc001_0015, 1), // AMD HWCR
    // AMD's virtualized SPEC_CTRL (VIRT_SPEC_CTRL).
    (0xc001_011f, 1),
];

/// MSRs a snapshot tries to save even where KVM does not list them: the MTRRs, which KVM
/// emulates without listing, and TSC_AUX, which some KVMs list only with RDTSCP or RDPID in
/// their supported CPUID. One that KVM cannot read for a vCPU is left out of its state.
pub(crate) fn unlisted() -> impl Iterator<Item = u32> {
    // Variable MTRRs (eight base and mask pairs), fixed MTRRs, MTRR_DEF_TYPE.
    (0x200..=0x20f)
        .chain([0x250, 0x258, 0x259])
        .chain(0x268..=0x26f)
        .chain([0x2ff, 0xc000_0103])
}

/// Whether MSR `index` is one a snapshot holds.
pub(crate) fn is_saved(index: u32) -> bool {
    SAVED_MSR_RANGES
        .iter()
        .any(|&(first, count)| index >= first && index - first < count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_msrs_are_the_listed_ranges() {
        for index in [
            0x10,
            0x11,
            0x12,
            0x174,
            0x176,
            0x277,
            0x2ff,
            0x6e0,
            0xc000_0080,
        ] {
            assert!(is_saved(index), "{index:#x}");
        }
        for index in [
            0,
            0x13,
            0x17b,
            0x3a,
            0x480,
            0x6e1,
            0xc1,
            0x4b56_4d08,
            u32::MAX,
        ] {
            assert!(!is_saved(index), "{index:#x}");
        }
    }
}
