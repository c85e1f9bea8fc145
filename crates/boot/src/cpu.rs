//! The state the boot vCPU starts in, as plain data.
//!
//! The loader decides where the kernel is entered and in which mode (64-bit long mode with the
//! identity page tables for an ELF vmlinux or bzImage, 32-bit protected mode without paging for PVH);
//! this module describes that decision without any KVM type, and the vCPU crate applies it.

/// One segment register, in the unpacked form KVM's `kvm_segment` uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Segment base address.
    pub base: u64,
    /// Segment limit in bytes: the descriptor's limit, scaled from 4 KiB units when
    /// `granularity` is set (a flat 4 GiB segment has 0xffff_ffff), as KVM's `kvm_segment` holds it.
    pub limit: u32,
    /// Selector: index into the GDT shifted left by 3.
    pub selector: u16,
    /// Segment type (the 4-bit type field of the descriptor).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size: 32-bit when set.
    pub db: bool,
    /// Descriptor type: code or data when set, system when clear.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units when set.
    pub granularity: bool,
    /// Available for system software.
    pub avl: bool,
    /// Set for a null, unusable segment.
    pub unusable: bool,
}

/// A descriptor table register (GDTR or IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address of the table.
    pub base: u64,
    /// Size of the table in bytes, minus one.
    pub limit: u16,
}

/// General purpose registers the boot protocols define. Others start at 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
    /// Instruction pointer: the kernel's entry point.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer.
    pub rbp: u64,
    /// Linux 64-bit boot protocol: address of the boot_params zero page.
    pub rsi: u64,
    /// PVH boot protocol: address of the `hvm_start_info` structure.
    pub rbx: u64,
    /// Flags; bit 1 is reserved and always set.
    pub rflags: u64,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    /// Code segment.
    pub cs: Segment,
    /// Data segment.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS segment.
    pub fs: Segment,
    /// GS segment.
    pub gs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Task register.
    pub tr: Segment,
    /// Local descriptor table register.
    pub ldt: Segment,
    /// Global descriptor table.
    pub gdt: DescriptorTable,
    /// Interrupt descriptor table.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR3: physical address of the top-level page table when paging is on.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// Extended feature enable register.
    pub efer: u64,
}

/// Everything the boot vCPU needs set before its first instruction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuState {
    /// General purpose registers.
    pub regs: Registers,
    /// Segment, control and descriptor-table registers.
    pub sregs: SpecialRegisters,
}

/// CR0 bit: protected mode enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0 bit: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0 bit: paging enable.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4 bit: physical address extension, required by long mode.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER bit: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER bit: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, reserved and always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
