//! Conversions between ember's plain-data boot CPU state and KVM's register structures.
//!
//! [`ember_boot::cpu`] describes segments the way `kvm_segment` does (the limit in bytes, the
//! attribute bits unpacked), so the conversions copy fields one to one; they are lossless for
//! everything [`CpuState`] holds.

use ember_boot::cpu::{CpuState, DescriptorTable, Registers, Segment, SpecialRegisters};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// RFLAGS bit 1 is reserved and always reads as one.
const RFLAGS_RESERVED_ONE: u64 = 1 << 1;

/// The general purpose registers of `regs`; registers [`Registers`] does not name are zero and
/// the reserved RFLAGS bit 1 is set.
pub(crate) fn kvm_regs_from(regs: &Registers) -> kvm_regs {
    kvm_regs {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
        rsi: regs.rsi,
        rbx: regs.rbx,
        rflags: regs.rflags | RFLAGS_RESERVED_ONE,
        ..Default::default()
    }
}

/// The registers of `regs` that [`Registers`] names.
pub(crate) fn registers_from(regs: &kvm_regs) -> Registers {
    Registers {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
        rsi: regs.rsi,
        rbx: regs.rbx,
        rflags: regs.rflags,
    }
}

/// Replaces the segment, descriptor-table and control registers of `sregs` with those of
/// `state`; CR2, CR8, the APIC base and the pending-interrupt bitmap keep their values.
pub(crate) fn apply_special_registers(sregs: &mut kvm_sregs, state: &SpecialRegisters) {
    sregs.cs = kvm_segment_from(&state.cs);
    sregs.ds = kvm_segment_from(&state.ds);
    sregs.es = kvm_segment_from(&state.es);
    sregs.fs = kvm_segment_from(&state.fs);
    sregs.gs = kvm_segment_from(&state.gs);
    sregs.ss = kvm_segment_from(&state.ss);
    sregs.tr = kvm_segment_from(&state.tr);
    sregs.ldt = kvm_segment_from(&state.ldt);
    sregs.gdt = kvm_dtable_from(&state.gdt);
    sregs.idt = kvm_dtable_from(&state.idt);
    sregs.cr0 = state.cr0;
    sregs.cr3 = state.cr3;
    sregs.cr4 = state.cr4;
    sregs.efer = state.efer;
}

/// The registers of `sregs` that [`SpecialRegisters`] names.
pub(crate) fn special_registers_from(sregs: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: segment_from(&sregs.cs),
        ds: segment_from(&sregs.ds),
        es: segment_from(&sregs.es),
        fs: segment_from(&sregs.fs),
        gs: segment_from(&sregs.gs),
        ss: segment_from(&sregs.ss),
        tr: segment_from(&sregs.tr),
        ldt: segment_from(&sregs.ldt),
        gdt: descriptor_table_from(&sregs.gdt),
        idt: descriptor_table_from(&sregs.idt),
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    }
}

/// The CPU state held by `regs` and `sregs`.
pub(crate) fn cpu_state_from(regs: &kvm_regs, sregs: &kvm_sregs) -> CpuState {
    CpuState {
        regs: registers_from(regs),
        sregs: special_registers_from(sregs),
    }
}

fn kvm_segment_from(segment: &Segment) -> kvm_segment {
    kvm_segment {
        base: segment.base,
        limit: segment.limit,
        selector: segment.selector,
        type_: segment.type_,
        present: u8::from(segment.present),
        dpl: segment.dpl,
        db: u8::from(segment.db),
        s: u8::from(segment.s),
        l: u8::from(segment.l),
        g: u8::from(segment.granularity),
        avl: u8::from(segment.avl),
        unusable: u8::from(segment.unusable),
        padding: 0,
    }
}

fn segment_from(segment: &kvm_segment) -> Segment {
    Segment {
        base: segment.base,
        limit: segment.limit,
        selector: segment.selector,
        type_: segment.type_,
        present: segment.present != 0,
        dpl: segment.dpl,
        db: segment.db != 0,
        s: segment.s != 0,
        l: segment.l != 0,
        granularity: segment.g != 0,
        avl: segment.avl != 0,
        unusable: segment.unusable != 0,
    }
}

fn kvm_dtable_from(table: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: table.base,
        limit: table.limit,
        padding: [0; 3],
    }
}

fn descriptor_table_from(table: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: table.base,
        limit: table.limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_mode_state() -> CpuState {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            granularity: true,
            avl: false,
            unusable: false,
        };
        let data = Segment {
            selector: 0x10,
            type_: 0x3,
            db: true,
            l: false,
            ..code
        };
        CpuState {
            regs: Registers {
                rip: 0x100_0000,
                rsp: 0x8ff0,
                rbp: 0x8ff0,
                rsi: 0x7000,
                rbx: 0x6000,
                rflags: 0x2,
            },
            sregs: SpecialRegisters {
                cs: code,
                ds: data,
                es: data,
                fs: data,
                gs: data,
                ss: data,
                tr: Segment {
                    selector: 0x18,
                    type_: 0xb,
                    s: false,
                    l: false,
                    limit: 0x67,
                    granularity: false,
                    ..code
                },
                ldt: Segment {
                    unusable: true,
                    ..Segment::default()
                },
                gdt: DescriptorTable {
                    base: 0x500,
                    limit: 31,
                },
                idt: DescriptorTable {
                    base: 0x520,
                    limit: 7,
                },
                cr0: 0x8000_0011,
                cr3: 0x9000,
                cr4: 0x20,
                efer: 0x500,
            },
        }
    }

    #[test]
    fn state_survives_a_round_trip_through_kvm_structures() {
        let state = long_mode_state();
        let regs = kvm_regs_from(&state.regs);
        let mut sregs = kvm_sregs::default();
        apply_special_registers(&mut sregs, &state.sregs);
        assert_eq!(cpu_state_from(&regs, &sregs), state);
    }

    #[test]
    fn segment_fields_map_one_to_one() {
        let state = long_mode_state();
        let mut sregs = kvm_sregs::default();
        apply_special_registers(&mut sregs, &state.sregs);
        let cs = sregs.cs;
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.type_),
            (0, 0xffff_ffff, 0x8, 0xb)
        );
        assert_eq!(
            (
                cs.present,
                cs.dpl,
                cs.db,
                cs.s,
                cs.l,
                cs.g,
                cs.avl,
                cs.unusable
            ),
            (1, 0, 0, 1, 1, 1, 0, 0)
        );
        assert_eq!(sregs.ldt.unusable, 1);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!(
            (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer),
            (0x8000_0011, 0x9000, 0x20, 0x500)
        );
    }

    #[test]
    fn registers_outside_cpu_state_are_kept_or_zeroed() {
        let mut sregs = kvm_sregs {
            cr2: 0x1234,
            cr8: 0xf,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        sregs.interrupt_bitmap[1] = 0x10;
        apply_special_registers(&mut sregs, &long_mode_state().sregs);
        assert_eq!(
            (sregs.cr2, sregs.cr8, sregs.apic_base),
            (0x1234, 0xf, 0xfee0_0900)
        );
        assert_eq!(sregs.interrupt_bitmap[1], 0x10);

        let regs = kvm_regs_from(&Registers::default());
        assert_eq!(regs.rflags, 0x2, "the reserved flag is always set");
        assert_eq!((regs.rax, regs.rcx, regs.rdi, regs.r15), (0, 0, 0, 0));
    }
}
