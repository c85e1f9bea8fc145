//! Per-vCPU CPUID: the leaves KVM supports, with one vCPU's identity and the VM's topology.
//!
//! Every vCPU starts from `KVM_GET_SUPPORTED_CPUID` and gets:
//!
//! - its APIC id in leaf 1, the x2APIC topology leaves 0xb and 0x1f, and AMD's 0x8000_001e;
//! - a topology of `count` single-threaded cores in one package (leaves 1, 4, 0xb, 0x1f and AMD's
//!   0x8000_0001, 0x8000_0008, 0x8000_001d);
//! - the TSC-deadline mode of the APIC timer (leaf 1 ECX bit 24) where KVM emulates it, which
//!   `KVM_GET_SUPPORTED_CPUID` leaves out because it depends on the in-kernel local APIC (with
//!   it, Linux skips the 100 ms calibration of the APIC timer at boot);
//! - the hypervisor bit (leaf 1 ECX bit 31); KVM's signature and feature leaves from 0x4000_0000
//!   stay as KVM reports them, so the guest finds kvmclock and the other paravirtual features;
//! - no power management beyond an always-running APIC timer (leaf 6) and no performance
//!   monitoring (leaf 0xa), which ember does not virtualize.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Leaf 1 ECX: the APIC timer has a TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the package has more than one logical processor (hyper-threading technology).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 EBX bits 31:24: initial APIC id.
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// Leaf 1 EBX bits 23:16: addressable logical processors in the package.
const LEAF1_EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
/// Leaf 1 EBX bits 15:0 (brand index, CLFLUSH size) are kept.
const LEAF1_EBX_KEPT: u32 = 0xffff;

/// Leaf 4 EAX bits 4:0: cache type, 0 for the terminating subleaf.
const LEAF4_EAX_TYPE_MASK: u32 = 0x1f;
/// Leaf 4 (and AMD 0x8000_001d) EAX bits 7:5: cache level.
const CACHE_EAX_LEVEL_SHIFT: u32 = 5;
/// Leaf 4 (and AMD 0x8000_001d) EAX bits 25:14: logical processors sharing the cache, minus one.
const CACHE_EAX_SHARING_SHIFT: u32 = 14;
const CACHE_EAX_SHARING_MASK: u32 = 0xfff << CACHE_EAX_SHARING_SHIFT;
/// Leaf 4 EAX bits 31:26: cores in the package, minus one.
const LEAF4_EAX_CORES_SHIFT: u32 = 26;
const LEAF4_EAX_CORES_MASK: u32 = 0x3f << LEAF4_EAX_CORES_SHIFT;

/// Leaf 6 EAX bit 2: the APIC timer runs at a constant rate in all power states.
const LEAF6_EAX_ARAT: u32 = 1 << 2;

/// The extended topology leaves, and how many subleaves describe ember's topology in them: the
/// thread level, the core level and the terminating invalid level.
const TOPOLOGY_LEAVES: [u32; 2] = [0xb, 0x1f];
const TOPOLOGY_SUBLEAVES: u32 = 3;
/// Leaves 0xb and 0x1f ECX bits 15:8: the level type.
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
const TOPOLOGY_ECX_TYPE_SHIFT: u32 = 8;

/// AMD 0x8000_0001 ECX bit 1: the logical processor count of leaf 1 counts cores.
const AMD_EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// AMD 0x8000_0008 ECX bits 7:0: cores in the package, minus one.
const AMD_EXT8_ECX_NC_MASK: u32 = 0xff;
/// AMD 0x8000_0008 ECX bits 15:12: APIC id bits that number the cores.
const AMD_EXT8_ECX_APIC_ID_SIZE_SHIFT: u32 = 12;
const AMD_EXT8_ECX_APIC_ID_SIZE_MASK: u32 = 0xf << AMD_EXT8_ECX_APIC_ID_SIZE_SHIFT;

/// CPU vendors whose vendor-specific leaves are adjusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD and Hygon, which share AMD's extended topology leaves.
    Amd,
    Other,
}

impl Vendor {
    /// Reads the vendor string of leaf 0 (EBX, EDX, ECX).
    fn of(entries: &[kvm_cpuid_entry2]) -> Self {
        let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
            return Vendor::Other;
        };
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// The topology ember presents: `count` cores of one thread each in one package; a vCPU's APIC
/// id is its index.
#[derive(Debug, Clone, Copy)]
struct Topology {
    apic_id: u8,
    count: u8,
}

impl Topology {
    /// APIC id bits that number the cores: enough for ids `0..count`.
    fn core_bits(&self) -> u32 {
        match self.count {
            0 | 1 => 0,
            n => u8::BITS - (n - 1).leading_zeros(),
        }
    }
}

/// Adds the TSC-deadline timer to leaf 1 of `supported`, for a VM whose in-kernel local APIC
/// emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`).
pub(crate) fn add_tsc_deadline_timer(supported: &mut CpuId) {
    for entry in supported.as_mut_slice() {
        if entry.function == 0x1 {
            entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
    }
}

/// The CPUID of vCPU `index` of a VM of `count` vCPUs, derived from the `supported` leaves.
///
/// `index` is also the vCPU's APIC id; callers check `index < count`.
///
/// # Errors
///
/// When the extended topology subleaves that KVM left out do not fit in a `kvm_cpuid2`.
pub(crate) fn vcpu_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let vendor = Vendor::of(supported.as_slice());
    let topology = Topology {
        apic_id: index,
        count,
    };
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !TOPOLOGY_LEAVES.contains(&e.function))
        .copied()
        .collect();
    // Some hosts report only the first subleaf of the extended topology leaves; give each of
    // them the full set of levels this topology has.
    for leaf in TOPOLOGY_LEAVES {
        if supported.as_slice().iter().any(|e| e.function == leaf) {
            entries.extend((0..TOPOLOGY_SUBLEAVES).map(|subleaf| kvm_cpuid_entry2 {
                function: leaf,
                index: subleaf,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            }));
        }
    }
    for entry in &mut entries {
        update_entry(entry, vendor, topology);
    }
    CpuId::from_entries(&entries)
}

/// Applies ember's changes to one leaf.
fn update_entry(entry: &mut kvm_cpuid_entry2, vendor: Vendor, topology: Topology) {
    let apic_id = u32::from(topology.apic_id);
    let count = u32::from(topology.count);
    let cores_minus_one = count.saturating_sub(1);
    match (entry.function, vendor) {
        (0x1, _) => {
            entry.ebx = (entry.ebx & LEAF1_EBX_KEPT)
                | (apic_id << LEAF1_EBX_APIC_ID_SHIFT)
                | (count << LEAF1_EBX_LOGICAL_COUNT_SHIFT);
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        (0x4, _) if entry.eax & LEAF4_EAX_TYPE_MASK != 0 => {
            let sharing = cache_sharing(entry.eax, cores_minus_one);
            entry.eax = (entry.eax & !(CACHE_EAX_SHARING_MASK | LEAF4_EAX_CORES_MASK))
                | (sharing << CACHE_EAX_SHARING_SHIFT)
                | (cores_minus_one.min(0x3f) << LEAF4_EAX_CORES_SHIFT);
        }
        (0x6, _) => {
            entry.eax &= LEAF6_EAX_ARAT;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (0xa, _) => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (0xb | 0x1f, _) => {
            let subleaf = entry.index;
            let (shift, logical, level_type) = match subleaf {
                0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                1 => (topology.core_bits(), count, TOPOLOGY_LEVEL_CORE),
                _ => (0, 0, 0),
            };
            entry.eax = shift;
            entry.ebx = logical;
            entry.ecx = (level_type << TOPOLOGY_ECX_TYPE_SHIFT) | (subleaf & 0xff);
            entry.edx = apic_id;
        }
        (0x8000_0001, Vendor::Amd) => {
            if count > 1 {
                entry.ecx |= AMD_EXT1_ECX_CMP_LEGACY;
            } else {
                entry.ecx &= !AMD_EXT1_ECX_CMP_LEGACY;
            }
        }
        (0x8000_0008, Vendor::Amd) => {
            entry.ecx = (entry.ecx & !(AMD_EXT8_ECX_NC_MASK | AMD_EXT8_ECX_APIC_ID_SIZE_MASK))
                | cores_minus_one.min(AMD_EXT8_ECX_NC_MASK)
                | (topology.core_bits() << AMD_EXT8_ECX_APIC_ID_SIZE_SHIFT);
        }
        (0x8000_001d, Vendor::Amd) if entry.eax & LEAF4_EAX_TYPE_MASK != 0 => {
            let sharing = cache_sharing(entry.eax, cores_minus_one);
            entry.eax =
                (entry.eax & !CACHE_EAX_SHARING_MASK) | (sharing << CACHE_EAX_SHARING_SHIFT);
        }
        (0x8000_001e, Vendor::Amd) => {
            // Extended APIC id; compute unit (core) id with one thread per unit; node 0 of one.
            entry.eax = apic_id;
            entry.ebx = apic_id;
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Logical processors sharing a cache, minus one, for a cache whose leaf-4-style EAX is `eax`:
/// level 1 and 2 caches belong to one single-threaded core, others to the whole package.
fn cache_sharing(eax: u32, cores_minus_one: u32) -> u32 {
    match (eax >> CACHE_EAX_LEVEL_SHIFT) & 0x7 {
        1 | 2 => 0,
        _ => cores_minus_one.min(0xfff),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// Leaf 0 with `vendor` and a few leaves with every bit set, as a hostile starting point.
    fn supported(vendor: &[u8; 12]) -> CpuId {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        let entries = [
            entry(0, 0, [0x1f, word(0), word(8), word(4)]),
            entry(1, 0, [0x806f8, 0x0000_0800, 0x7ffa_3203, 0x178b_fbff]),
            entry(4, 0, [0xffff_ff21, 1, 2, 3]),
            entry(4, 1, [0xffff_ff43, 1, 2, 3]),
            entry(4, 2, [0xffff_ff63, 1, 2, 3]),
            entry(4, 3, [0, 0, 0, 0]),
            entry(6, 0, [u32::MAX; 4]),
            entry(0xa, 0, [u32::MAX; 4]),
            entry(0xb, 0, [u32::MAX; 4]),
            entry(0xb, 1, [u32::MAX; 4]),
            entry(0xb, 2, [u32::MAX; 4]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x8000_0001, 0, [0, 0, 0, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x0003_f0ff, 0]),
            entry(0x8000_001d, 0, [0x121, 0, 0, 0]),
            entry(0x8000_001d, 1, [0x163, 0xffff_ffff, 0, 0]),
            entry(0x8000_001e, 0, [u32::MAX; 4]),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_htt_and_hypervisor_bit() {
        let base = supported(b"GenuineIntel");
        let cpuid = vcpu_cpuid(&base, 3, 4).unwrap();
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size is kept");
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.edx & (1 << 28), 0);
        assert_eq!(leaf1.eax, 0x806f8);

        let single = find(&vcpu_cpuid(&base, 0, 1).unwrap(), 1, 0);
        assert_eq!(single.edx & (1 << 28), 0);
        assert_eq!((single.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn tsc_deadline_timer_is_added_to_leaf_1_only() {
        let mut base = supported(b"AuthenticAMD");
        for entry in base.as_mut_slice() {
            entry.ecx &= !(1 << 24);
        }
        let before: Vec<_> = base.as_slice().to_vec();
        add_tsc_deadline_timer(&mut base);
        assert_ne!(find(&base, 1, 0).ecx & (1 << 24), 0);
        for (old, new) in before.iter().zip(base.as_slice()) {
            if old.function != 1 {
                assert_eq!(old, new);
            }
        }
        let leaf1 = find(&vcpu_cpuid(&base, 0, 2).unwrap(), 1, 0);
        assert_ne!(leaf1.ecx & (1 << 24), 0, "kept in every vCPU's CPUID");
    }

    #[test]
    fn x2apic_topology_describes_single_threaded_cores() {
        let cpuid = vcpu_cpuid(&supported(b"GenuineIntel"), 5, 6).unwrap();
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&cpuid, 0xb, 1);
        // Six cores need three APIC id bits.
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        // As some hosts report it: leaf 0xb with subleaf 0 only, and no leaf 0x1f.
        let base =
            CpuId::from_entries(&[entry(0, 0, [0x1c, 0, 0, 0]), entry(0xb, 0, [0, 0, 0, 0])])
                .unwrap();
        let cpuid = vcpu_cpuid(&base, 1, 2).unwrap();
        let levels: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == 0xb)
            .map(|e| (e.index, e.flags, e.ecx, e.edx))
            .collect();
        assert_eq!(levels, [(0, 1, 0x100, 1), (1, 1, 0x201, 1), (2, 1, 2, 1)]);
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn core_bits_cover_every_apic_id() {
        for (count, bits) in [
            (1u8, 0u32),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (128, 7),
            (255, 8),
        ] {
            let topology = Topology { apic_id: 0, count };
            assert_eq!(topology.core_bits(), bits, "{count} vCPUs");
        }
    }

    #[test]
    fn cache_leaves_share_l3_across_cores_only() {
        let cpuid = vcpu_cpuid(&supported(b"GenuineIntel"), 0, 4).unwrap();
        let l1 = find(&cpuid, 4, 0);
        let l2 = find(&cpuid, 4, 1);
        let l3 = find(&cpuid, 4, 2);
        for leaf in [l1, l2, l3] {
            assert_eq!(leaf.eax >> 26, 3, "cores per package minus one");
        }
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l2.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l1.eax & 0x3fff, 0x3f21 & 0x3fff, "type and level are kept");
        assert_eq!(
            find(&cpuid, 4, 3).eax,
            0,
            "the terminating subleaf is left alone"
        );
    }

    #[test]
    fn power_management_and_perfmon_are_hidden() {
        let cpuid = vcpu_cpuid(&supported(b"GenuineIntel"), 0, 1).unwrap();
        let leaf6 = find(&cpuid, 6, 0);
        assert_eq!(
            (leaf6.eax, leaf6.ebx, leaf6.ecx, leaf6.edx),
            (1 << 2, 0, 0, 0)
        );
        let leaf_a = find(&cpuid, 0xa, 0);
        assert_eq!(
            (leaf_a.eax, leaf_a.ebx, leaf_a.ecx, leaf_a.edx),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn kvm_signature_leaf_is_preserved() {
        let base = supported(b"GenuineIntel");
        let cpuid = vcpu_cpuid(&base, 1, 2).unwrap();
        assert_eq!(find(&cpuid, 0x4000_0000, 0), find(&base, 0x4000_0000, 0));
    }

    #[test]
    fn amd_extended_topology_leaves_follow_the_vcpu_count() {
        let cpuid = vcpu_cpuid(&supported(b"AuthenticAMD"), 2, 3).unwrap();
        assert_ne!(find(&cpuid, 0x8000_0001, 0).ecx & (1 << 1), 0);
        let ext8 = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(ext8.ecx & 0xff, 2);
        assert_eq!((ext8.ecx >> 12) & 0xf, 2);
        assert_eq!(ext8.ecx & 0x3_0000, 0x3_0000, "other fields are kept");
        let ext1e = find(&cpuid, 0x8000_001e, 0);
        assert_eq!((ext1e.eax, ext1e.ebx, ext1e.ecx, ext1e.edx), (2, 2, 0, 0));
        assert_eq!((find(&cpuid, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!(find(&cpuid, 0x8000_001d, 1).eax >> 14, 2);
    }

    #[test]
    fn amd_leaves_are_left_alone_on_intel() {
        let base = supported(b"GenuineIntel");
        let cpuid = vcpu_cpuid(&base, 2, 3).unwrap();
        for function in [0x8000_0001, 0x8000_0008, 0x8000_001e] {
            assert_eq!(find(&cpuid, function, 0), find(&base, function, 0));
        }
    }
}
