//! Whether a saved vCPU can run on this host: the host's CPU model, and the CPU features a
//! saved guest saw checked against those this host's KVM offers.
//!
//! A guest checks the CPU features once, at boot, and uses them from then on. Restored on a
//! host without one of them, it does not fail at the restore but later, at the first
//! instruction of the missing feature, which then faults. [`Vcpu::check_compatible`] refuses
//! such a state beforehand and names each missing feature: every bit the guest saw set in the
//! feature registers of CPUID leaves 1, 7, 0xd and 0x8000_0001 must be one that KVM gives a new
//! vCPU here.
//! [`HostCpu`] is the CPU model, for a snapshot to record where it was made.

use std::fmt;

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};
use serde::{Deserialize, Serialize};

use crate::vcpu::{Vcpu, VcpuState};

/// Errors of the compatibility check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `KVM_GET_CPUID2` failed on the vCPU checked.
    #[error("Cannot read the CPUID of the vCPU")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// The saved vCPU saw CPU features this host's KVM does not offer.
    #[error(
        "This host lacks CPU features the saved vCPU uses: {}",
        MissingList(.missing)
    )]
    MissingFeatures {
        /// Each feature missing here, in leaf order.
        missing: Vec<MissingFeature>,
    },
}

/// A register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuidRegister {
    fn of(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            CpuidRegister::Eax => entry.eax,
            CpuidRegister::Ebx => entry.ebx,
            CpuidRegister::Ecx => entry.ecx,
            CpuidRegister::Edx => entry.edx,
        }
    }
}

impl fmt::Display for CpuidRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuidRegister::Eax => "EAX",
            CpuidRegister::Ebx => "EBX",
            CpuidRegister::Ecx => "ECX",
            CpuidRegister::Edx => "EDX",
        })
    }
}

/// A CPU feature, by the CPUID bit that announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingFeature {
    /// The CPUID leaf (EAX).
    pub leaf: u32,
    /// The subleaf (ECX).
    pub subleaf: u32,
    /// The register.
    pub register: CpuidRegister,
    /// The bit, 0 to 31.
    pub bit: u8,
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CPUID leaf {:#x} subleaf {} {} bit {}",
            self.leaf, self.subleaf, self.register, self.bit
        )
    }
}

/// Displays a list of features, comma separated.
struct MissingList<'a>(&'a [MissingFeature]);

impl fmt::Display for MissingList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, feature) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{feature}")?;
        }
        Ok(())
    }
}

/// A feature register that is checked, and the bits of it that are not features of the host:
/// set by ember or by KVM from the guest's own state.
struct Checked {
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    not_host_features: u32,
}

const fn checked(leaf: u32, subleaf: u32, register: CpuidRegister, ignored: u32) -> Checked {
    Checked {
        leaf,
        subleaf,
        register,
        not_host_features: ignored,
    }
}

/// Leaf 1 ECX: OSXSAVE (27) mirrors the guest's CR4; the hypervisor bit (31) is ember's.
const LEAF1_ECX_IGNORED: u32 = (1 << 27) | (1 << 31);
/// Leaf 1 EDX: HTT (28) describes ember's topology.
const LEAF1_EDX_IGNORED: u32 = 1 << 28;
/// Leaf 7 ECX: OSPKE (4) mirrors the guest's CR4.
const LEAF7_ECX_IGNORED: u32 = 1 << 4;
/// Leaf 0x8000_0001 ECX: CmpLegacy (1) describes ember's topology.
const EXT1_ECX_IGNORED: u32 = 1 << 1;

/// The feature registers checked.
const CHECKED: [Checked; 11] = [
    checked(1, 0, CpuidRegister::Ecx, LEAF1_ECX_IGNORED),
    checked(1, 0, CpuidRegister::Edx, LEAF1_EDX_IGNORED),
    checked(7, 0, CpuidRegister::Ebx, 0),
    checked(7, 0, CpuidRegister::Ecx, LEAF7_ECX_IGNORED),
    checked(7, 0, CpuidRegister::Edx, 0),
    checked(7, 1, CpuidRegister::Eax, 0),
    // The XSAVE state components (XCR0, low and high) and XSAVE instructions.
    checked(0xd, 0, CpuidRegister::Eax, 0),
    checked(0xd, 0, CpuidRegister::Edx, 0),
    checked(0xd, 1, CpuidRegister::Eax, 0),
    checked(0x8000_0001, 0, CpuidRegister::Ecx, EXT1_ECX_IGNORED),
    checked(0x8000_0001, 0, CpuidRegister::Edx, 0),
];

/// The entry of `leaf` and `subleaf` in `entries`.
fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == leaf && (e.index == subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

/// Checks that every feature bit of `saved` (a guest's CPUID) is in `supported` (what KVM
/// offers on this host).
///
/// # Errors
///
/// [`Error::MissingFeatures`] naming each missing feature.
pub fn check_cpuid(
    saved: &[kvm_cpuid_entry2],
    supported: &[kvm_cpuid_entry2],
) -> Result<(), Error> {
    let mut missing = Vec::new();
    for check in &CHECKED {
        let Some(saved) = find(saved, check.leaf, check.subleaf) else {
            continue;
        };
        let offered =
            find(supported, check.leaf, check.subleaf).map_or(0, |e| check.register.of(e));
        let lacking = check.register.of(saved) & !offered & !check.not_host_features;
        missing.extend(
            (0..32u8)
                .filter(|bit| lacking & (1 << bit) != 0)
                .map(|bit| MissingFeature {
                    leaf: check.leaf,
                    subleaf: check.subleaf,
                    register: check.register,
                    bit,
                }),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingFeatures { missing })
    }
}

impl Vcpu {
    /// Checks that this host offers every CPU feature the saved vCPU saw, see the [module
    /// docs](self). Call it on a vCPU made by [`Vcpu::new`], before
    /// [`restore_state`](Vcpu::restore_state): the features offered are those of the CPUID
    /// KVM gives this new vCPU.
    ///
    /// # Errors
    ///
    /// [`Error::MissingFeatures`] naming each missing feature; [`Error::GetCpuid`] when the
    /// vCPU's CPUID cannot be read.
    pub fn check_compatible(&self, state: &VcpuState) -> Result<(), Error> {
        let offered = self.kvm_cpuid().map_err(Error::GetCpuid)?;
        check_cpuid(&state.cpuid, &offered)
    }
}

/// A CPU model, as CPUID describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostCpu {
    /// The vendor string of leaf 0, such as `GenuineIntel` or `AuthenticAMD`.
    pub vendor: String,
    /// The family, with the extended family added in.
    pub family: u32,
    /// The model, with the extended model added in.
    pub model: u32,
    /// The stepping.
    pub stepping: u32,
    /// The brand string of leaves 0x8000_0002 to 0x8000_0004, trimmed; empty where absent.
    pub brand: String,
}

impl HostCpu {
    /// The CPU this process runs on.
    pub fn current() -> Self {
        Self::from_leaves(|leaf| {
            #[allow(unused_unsafe)]
            // SAFETY: CPUID is an unprivileged instruction every x86_64 CPU has; it only
            // writes the four registers `__cpuid` returns.
            let result = unsafe { std::arch::x86_64::__cpuid(leaf) };
            Some([result.eax, result.ebx, result.ecx, result.edx])
        })
    }

    /// The CPU a guest was shown, from its CPUID (that of a [`VcpuState`], for example).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        Self::from_leaves(|leaf| find(entries, leaf, 0).map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
    }

    /// Decodes the model from `leaf`, which gives EAX, EBX, ECX and EDX of a leaf (subleaf 0).
    fn from_leaves(leaf: impl Fn(u32) -> Option<[u32; 4]>) -> Self {
        let mut vendor = Vec::with_capacity(12);
        let (mut family, mut model, mut stepping) = (0, 0, 0);
        if let Some([max, ebx, ecx, edx]) = leaf(0) {
            for word in [ebx, edx, ecx] {
                vendor.extend_from_slice(&word.to_le_bytes());
            }
            if max >= 1 {
                if let Some([eax, ..]) = leaf(1) {
                    (family, model, stepping) = decode_signature(eax);
                }
            }
        }
        let mut brand = Vec::with_capacity(48);
        let max_extended = leaf(0x8000_0000).map_or(0, |[eax, ..]| eax);
        if max_extended >= 0x8000_0004 {
            for function in 0x8000_0002..=0x8000_0004 {
                if let Some(registers) = leaf(function) {
                    for word in registers {
                        brand.extend_from_slice(&word.to_le_bytes());
                    }
                }
            }
        }
        HostCpu {
            vendor: text(&vendor),
            family,
            model,
            stepping,
            brand: text(&brand),
        }
    }
}

impl fmt::Display for HostCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )?;
        if !self.brand.is_empty() {
            write!(f, " ({})", self.brand)?;
        }
        Ok(())
    }
}

/// Family, model and stepping from leaf 1 EAX.
fn decode_signature(eax: u32) -> (u32, u32, u32) {
    let stepping = eax & 0xf;
    let base_family = (eax >> 8) & 0xf;
    let base_model = (eax >> 4) & 0xf;
    let family = match base_family {
        0xf => base_family + ((eax >> 20) & 0xff),
        _ => base_family,
    };
    let model = match base_family {
        0x6 | 0xf => base_model | (((eax >> 16) & 0xf) << 4),
        _ => base_model,
    };
    (family, model, stepping)
}

/// The text of CPUID bytes, up to the first NUL, without surrounding spaces.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn a_cpuid_within_the_supported_one_is_compatible() {
        let supported = [
            entry(1, 0, [0, 0, 0x0000_0201, 0x0000_0011]),
            entry(7, 0, [0, 0xff, 0, 0]),
        ];
        let saved = [
            // The hypervisor and OSXSAVE bits are not host features.
            entry(1, 0, [0, 0, 0x8800_0001, 0x0000_0010]),
            entry(7, 0, [0, 0x0f, 0, 0]),
        ];
        check_cpuid(&saved, &supported).unwrap();
    }

    #[test]
    fn each_missing_feature_is_named() {
        let supported = [
            entry(1, 0, [0, 0, 0x1, 0]),
            entry(7, 0, [0, 0x1, 0, 0]),
            entry(7, 1, [0, 0, 0, 0]),
        ];
        let saved = [
            entry(1, 0, [0, 0, 0x3, 0]),
            entry(7, 0, [0, 0x1 | (1 << 16), 0, 0]),
            entry(7, 1, [1 << 4, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0, 1 << 29]),
        ];
        let err = check_cpuid(&saved, &supported).unwrap_err();
        let Error::MissingFeatures { missing } = &err else {
            panic!("{err}");
        };
        assert_eq!(
            missing,
            &[
                MissingFeature {
                    leaf: 1,
                    subleaf: 0,
                    register: CpuidRegister::Ecx,
                    bit: 1
                },
                MissingFeature {
                    leaf: 7,
                    subleaf: 0,
                    register: CpuidRegister::Ebx,
                    bit: 16
                },
                MissingFeature {
                    leaf: 7,
                    subleaf: 1,
                    register: CpuidRegister::Eax,
                    bit: 4
                },
                MissingFeature {
                    leaf: 0x8000_0001,
                    subleaf: 0,
                    register: CpuidRegister::Edx,
                    bit: 29
                },
            ]
        );
        assert_eq!(
            err.to_string(),
            "This host lacks CPU features the saved vCPU uses: CPUID leaf 0x1 subleaf 0 ECX \
             bit 1, CPUID leaf 0x7 subleaf 0 EBX bit 16, CPUID leaf 0x7 subleaf 1 EAX bit 4, \
             CPUID leaf 0x80000001 subleaf 0 EDX bit 29"
        );
    }

    #[test]
    fn signatures_decode_extended_family_and_model() {
        // Intel Skylake-SP: family 6, model 0x55, stepping 4.
        assert_eq!(decode_signature(0x0005_0654), (6, 0x55, 4));
        // AMD Zen 2: family 0x17, model 0x31, stepping 0.
        assert_eq!(decode_signature(0x0083_0f10), (0x17, 0x31, 0));
        // An old family 5 part ignores the extended fields.
        assert_eq!(decode_signature(0x0001_0543), (5, 4, 3));
    }

    #[test]
    fn the_host_cpu_is_described() {
        let host = HostCpu::current();
        assert_eq!(host.vendor.len(), 12, "{host}");
        assert!(host.family > 0);
        let leaves = [
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x0005_0654, 0, 0, 0]),
        ];
        let guest = HostCpu::from_cpuid(&leaves);
        assert_eq!(guest.vendor, "GenuineIntel");
        assert_eq!((guest.family, guest.model, guest.stepping), (6, 0x55, 4));
        assert_eq!(guest.brand, "");
        assert_eq!(
            guest.to_string(),
            "GenuineIntel family 0x6 model 0x55 stepping 4"
        );
    }
}
