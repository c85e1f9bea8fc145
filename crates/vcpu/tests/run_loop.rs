//! Guests run one exit at a time with `Vcpu::run_once`, on this host's /dev/kvm.

mod common;

use common::{CODE_ADDR, MMIO_BASE, TestVm, enter_real_mode};
use ember_vcpu::{Vcpu, VcpuEvent, vcpu::Error};
use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;

#[test]
fn out_reaches_the_port_device() {
    // mov al, 0x42; out 0x80, al
    let guest = TestVm::new(&[0xb0, 0x42, 0xe6, 0x80]);
    let mut vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    assert_eq!(
        vcpu.run_once().unwrap(),
        VcpuEvent::IoOut { port: 0x80, len: 1 }
    );
    assert_eq!(guest.port_writes(0x80), [vec![0x42]]);
}

#[test]
fn mmio_writes_reach_the_device_and_reads_come_back_into_registers() {
    let code = [
        0xc6, 0x06, 0x10, 0x00, 0x7b, // mov byte [0x10], 123
        0xa0, 0x20, 0x00, // mov al, [0x20]
        0xe6, 0x80, // out 0x80, al
        0x66, 0xa1, 0x24, 0x00, // mov eax, [0x24]
        0x66, 0xe7, 0x84, // out 0x84, eax
    ];
    let guest = TestVm::new(&code);
    guest.mmio().read_value = 0x1234_5678;
    let mut vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    // Real mode reaches the MMIO gap through a data segment based there.
    let mut state = vcpu.cpu_state().unwrap();
    state.sregs.ds.base = MMIO_BASE;
    vcpu.set_boot_state(&state).unwrap();

    let events: Vec<_> = (0..4).map(|_| vcpu.run_once().unwrap()).collect();
    assert_eq!(
        events,
        [
            VcpuEvent::MmioWrite {
                addr: MMIO_BASE + 0x10,
                len: 1
            },
            VcpuEvent::MmioRead {
                addr: MMIO_BASE + 0x20,
                len: 1
            },
            VcpuEvent::IoOut { port: 0x80, len: 1 },
            VcpuEvent::MmioRead {
                addr: MMIO_BASE + 0x24,
                len: 4
            },
        ]
    );
    assert_eq!(
        vcpu.run_once().unwrap(),
        VcpuEvent::IoOut { port: 0x84, len: 4 }
    );
    assert_eq!(guest.mmio().writes, [(MMIO_BASE + 0x10, vec![123])]);
    assert_eq!(
        guest.mmio().reads,
        [(MMIO_BASE + 0x20, 1), (MMIO_BASE + 0x24, 4)]
    );
    // The VM counted each exit by its reason.
    let metrics = guest.vm.vcpu_metrics();
    assert_eq!(metrics.exit_mmio_write.get(), 1);
    assert_eq!(metrics.exit_mmio_read.get(), 2);
    assert_eq!(metrics.exit_io_out.get(), 2);
    assert_eq!(metrics.exit_io_in.get(), 0);
    assert_eq!(metrics.failures.get(), 0);
    assert_eq!(guest.port_writes(0x80), [vec![0x78]]);
    assert_eq!(
        guest.port_writes(0x84),
        [0x1234_5678u32.to_le_bytes().to_vec()]
    );
}

#[test]
fn accesses_without_a_device_read_zero_and_drop_writes() {
    let code = [
        0xba, 0xf8, 0x02, // mov dx, 0x2f8
        0xb0, 0xff, // mov al, 0xff
        0xec, // in al, dx
        0xe6, 0x80, // out 0x80, al
        0xee, // out dx, al
        0xa0, 0x00, 0x00, // mov al, [0] (ds based past the MMIO device)
        0xe6, 0x81, // out 0x81, al
    ];
    let guest = TestVm::new(&code);
    let mut vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let mut state = vcpu.cpu_state().unwrap();
    state.sregs.ds.base = MMIO_BASE + 0x10_0000;
    vcpu.set_boot_state(&state).unwrap();

    let events: Vec<_> = (0..5).map(|_| vcpu.run_once().unwrap()).collect();
    assert_eq!(
        events,
        [
            VcpuEvent::IoIn {
                port: 0x2f8,
                len: 1
            },
            VcpuEvent::IoOut { port: 0x80, len: 1 },
            VcpuEvent::IoOut {
                port: 0x2f8,
                len: 1
            },
            VcpuEvent::MmioRead {
                addr: MMIO_BASE + 0x10_0000,
                len: 1
            },
            VcpuEvent::IoOut { port: 0x81, len: 1 },
        ]
    );
    assert_eq!(guest.port_writes(0x80), [vec![0]]);
    assert_eq!(guest.port_writes(0x81), [vec![0]]);
    assert!(guest.mmio().reads.is_empty());
    // The bus handler counted the three accesses that hit nothing.
    assert_eq!(guest.handler.unhandled(), 3);
}

#[test]
fn each_vcpu_sees_its_own_apic_id_in_cpuid() {
    let code = [
        0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2, // cpuid
        0x66, 0xc1, 0xeb, 0x18, // shr ebx, 24
        0x88, 0xd8, // mov al, bl
        0xe6, 0x80, // out 0x80, al
        0x66, 0xb8, 0x0b, 0x00, 0x00, 0x00, // mov eax, 0xb
        0x66, 0x31, 0xc9, // xor ecx, ecx
        0x0f, 0xa2, // cpuid
        0x88, 0xd0, // mov al, dl
        0xe6, 0x81, // out 0x81, al
    ];
    let guest = TestVm::new(&code);
    let mut vcpus = [guest.vcpu(0, 2), guest.vcpu(1, 2)];
    for vcpu in &mut vcpus {
        enter_real_mode(vcpu);
        assert_eq!(
            vcpu.run_once().unwrap(),
            VcpuEvent::IoOut { port: 0x80, len: 1 }
        );
        assert_eq!(
            vcpu.run_once().unwrap(),
            VcpuEvent::IoOut { port: 0x81, len: 1 }
        );
    }
    // Leaf 1 EBX[31:24] and leaf 0xb EDX, for vCPU 0 then vCPU 1.
    assert_eq!(guest.port_writes(0x80), [vec![0], vec![1]]);
    assert_eq!(guest.port_writes(0x81), [vec![0], vec![1]]);
}

#[test]
fn triple_fault_shuts_the_vcpu_down() {
    // ud2, with an IDT too short for any vector.
    let guest = TestVm::new(&[0x0f, 0x0b]);
    let mut vcpu = guest.vcpu(0, 1);
    vcpu.set_boot_state(&guest.long_mode_state()).unwrap();
    assert_eq!(vcpu.run_once().unwrap(), VcpuEvent::Shutdown);
    // Where it stood: the ud2 on Intel, which keeps the state of the fault; the reset vector
    // on AMD, where KVM puts the vCPU through INIT at a shutdown.
    let report = vcpu.fault_report();
    assert!(
        report.starts_with(&format!("rip={CODE_ADDR:#x} ")) || report.starts_with("rip=0xfff0 "),
        "{report}"
    );
    for field in [" cr2=", " cr3=", " idt=", " tr=", " exception=", " nmi="] {
        assert!(report.contains(field), "{field} missing: {report}");
    }
}

#[test]
fn unemulated_instruction_is_an_internal_error_at_its_rip() {
    let code = [
        0x90, 0x90, 0x90, // nop; nop; nop
        0xf0, 0x48, 0x0f, 0xc7, 0x0e, // lock cmpxchg16b [rsi]
        0x0f, 0x94, 0xc0, // sete al
        0xe6, 0x80, // out 0x80, al
    ];
    let guest = TestVm::new(&code);
    let mut vcpu = guest.vcpu(0, 1);
    let mut state = guest.long_mode_state();
    state.regs.rsi = 0x3000;
    state.regs.rbx = 0x1234;
    vcpu.set_boot_state(&state).unwrap();

    let event = vcpu.run_once().unwrap();
    match event {
        // The host emulates guest kernel code and lacks this instruction.
        VcpuEvent::InternalError { suberror, rip } => {
            assert_eq!(suberror, KVM_INTERNAL_ERROR_EMULATION);
            assert_eq!(rip, Some(CODE_ADDR + 3));
            assert_eq!(
                event.failure().unwrap(),
                "KVM could not emulate the instruction at guest RIP 0x1003 (emulation failure)"
            );
        }
        // A host that runs the guest natively executes it: RDX:RAX (0) matched the zeroed
        // memory, which now holds RCX:RBX.
        VcpuEvent::IoOut { port: 0x80, len: 1 } => {
            assert_eq!(guest.port_writes(0x80), [vec![1]]);
            assert_eq!(guest.read_u64(0x3000), 0x1234);
            assert_eq!(guest.read_u64(0x3008), 0);
        }
        other => panic!("unexpected event {other:?}"),
    }
}

#[test]
fn boot_state_reads_back_as_set() {
    let guest = TestVm::new(&[]);
    let vcpu = guest.vcpu(0, 1);
    let mut state = guest.long_mode_state();
    state.regs.rsp = 0x8ff0;
    state.regs.rsi = 0x7000;
    vcpu.set_boot_state(&state).unwrap();
    assert_eq!(vcpu.cpu_state().unwrap(), state);
}

#[test]
fn vcpu_counts_and_indexes_out_of_range_are_rejected() {
    let guest = TestVm::new(&[]);
    let err = Vcpu::new(&guest.vm, 0, 0, guest.handler.clone()).unwrap_err();
    assert!(matches!(err, Error::NoVcpus), "{err}");
    assert_eq!(err.to_string(), "A VM needs at least one vCPU");

    let err = Vcpu::new(&guest.vm, 2, 2, guest.handler.clone()).unwrap_err();
    assert!(
        matches!(err, Error::IndexOutOfRange { index: 2, count: 2 }),
        "{err}"
    );

    // The largest count a u8 holds is within this host's limit; the limit check itself is
    // pinned with a smaller limit in the crate's unit tests.
    if guest.vm.max_vcpus() < 255 {
        let err = Vcpu::new(&guest.vm, 0, 255, guest.handler.clone()).unwrap_err();
        assert!(
            matches!(err, Error::TooManyVcpus { count: 255, .. }),
            "{err}"
        );
    }

    // The same index twice is refused by KVM.
    let _first = guest.vcpu(0, 1);
    let err = Vcpu::new(&guest.vm, 0, 1, guest.handler.clone()).unwrap_err();
    assert!(matches!(err, Error::CreateVcpu { index: 0, .. }), "{err}");
}
