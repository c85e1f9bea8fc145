//! ember-vcpu used the way another VMM uses it: the VMM's own exit handler, not ember's bus,
//! answers a real-mode guest's port and MMIO accesses. Depends on ember-vcpu, vm-memory and
//! nothing else of ember.

use std::sync::{Arc, Mutex};

use ember_vcpu::{ExitHandler, Kvm, Vcpu, VcpuEvent, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the guest code is loaded and entered.
const CODE_ADDR: u64 = 0x1000;
/// Guest RAM: 64 KiB from 0. Everything above is MMIO to KVM.
const RAM_SIZE: usize = 0x1_0000;
/// The guest's data segment base: its memory operands are MMIO accesses from there.
const MMIO_BASE: u64 = 0xd000_0000;

/// One access, as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    PioRead(u16, usize),
    PioWrite(u16, Vec<u8>),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
}

/// The foreign VMM's platform: a few registers at fixed addresses, all-ones everywhere else (as
/// an absent device reads on a PC), every access recorded.
#[derive(Debug, Default)]
struct Platform {
    accesses: Mutex<Vec<Access>>,
    /// Whether every read buffer arrived zeroed.
    reads_arrived_zeroed: Mutex<Vec<bool>>,
}

impl Platform {
    fn record(&self, access: Access) {
        self.accesses.lock().unwrap().push(access);
    }

    fn answer(&self, data: &mut [u8], value: Option<u64>) {
        self.reads_arrived_zeroed
            .lock()
            .unwrap()
            .push(data.iter().all(|&b| b == 0));
        match value {
            Some(value) => {
                let len = data.len().min(8);
                data[..len].copy_from_slice(&value.to_le_bytes()[..len]);
            }
            None => data.fill(0xff),
        }
    }
}

impl ExitHandler for Platform {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.record(Access::PioRead(port, data.len()));
        let value = match port {
            0x81 => Some(0x5a),
            0x84 => Some(0x1122_3344),
            _ => None,
        };
        self.answer(data, value);
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        self.record(Access::PioWrite(port, data.to_vec()));
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.record(Access::MmioRead(addr, data.len()));
        let value = (addr == MMIO_BASE + 0x20).then_some(0xcafe_f00d);
        self.answer(data, value);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.record(Access::MmioWrite(addr, data.to_vec()));
    }
}

#[test]
fn a_foreign_handler_sees_every_access_and_answers_the_reads() {
    let code = [
        0xb0, 0x42, // mov al, 0x42
        0xe6, 0x80, // out 0x80, al
        0xe4, 0x81, // in al, 0x81
        0xe6, 0x82, // out 0x82, al
        0x66, 0xe5, 0x84, // in eax, 0x84
        0x66, 0xa3, 0x00, 0x00, // mov [0], eax
        0xc6, 0x06, 0x10, 0x00, 0x7b, // mov byte [0x10], 0x7b
        0x66, 0xa1, 0x20, 0x00, // mov eax, [0x20]
        0x66, 0xe7, 0x86, // out 0x86, eax
        0xe4, 0x90, // in al, 0x90 (nothing there)
        0xe6, 0x88, // out 0x88, al
        0x8b, 0x1e, 0x00, 0x01, // mov bx, [0x100] (nothing there)
        0x89, 0xd8, // mov ax, bx
        0xe7, 0x8a, // out 0x8a, ax
    ];
    let memory =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap());
    memory.write_slice(&code, GuestAddress(CODE_ADDR)).unwrap();
    let vm = Vm::new(&Kvm::new().unwrap(), memory).unwrap();
    let platform = Arc::new(Platform::default());
    let mut vcpu = Vcpu::new(&vm, 0, 1, platform.clone()).unwrap();
    let mut state = vcpu.cpu_state().unwrap();
    state.sregs.cs.base = 0;
    state.sregs.cs.selector = 0;
    state.sregs.ds.base = MMIO_BASE;
    state.regs.rip = CODE_ADDR;
    vcpu.set_boot_state(&state).unwrap();

    let events: Vec<VcpuEvent> = (0..12).map(|_| vcpu.run_once().unwrap()).collect();
    assert_eq!(
        events,
        [
            VcpuEvent::IoOut { port: 0x80, len: 1 },
            VcpuEvent::IoIn { port: 0x81, len: 1 },
            VcpuEvent::IoOut { port: 0x82, len: 1 },
            VcpuEvent::IoIn { port: 0x84, len: 4 },
            VcpuEvent::MmioWrite {
                addr: MMIO_BASE,
                len: 4
            },
            VcpuEvent::MmioWrite {
                addr: MMIO_BASE + 0x10,
                len: 1
            },
            VcpuEvent::MmioRead {
                addr: MMIO_BASE + 0x20,
                len: 4
            },
            VcpuEvent::IoOut { port: 0x86, len: 4 },
            VcpuEvent::IoIn { port: 0x90, len: 1 },
            VcpuEvent::IoOut { port: 0x88, len: 1 },
            VcpuEvent::MmioRead {
                addr: MMIO_BASE + 0x100,
                len: 2
            },
            VcpuEvent::IoOut { port: 0x8a, len: 2 },
        ]
    );
    // The handler saw each access with its address and data, and the guest got back what the
    // handler answered: the writes that follow the reads carry the values read.
    assert_eq!(
        *platform.accesses.lock().unwrap(),
        [
            Access::PioWrite(0x80, vec![0x42]),
            Access::PioRead(0x81, 1),
            Access::PioWrite(0x82, vec![0x5a]),
            Access::PioRead(0x84, 4),
            Access::MmioWrite(MMIO_BASE, vec![0x44, 0x33, 0x22, 0x11]),
            Access::MmioWrite(MMIO_BASE + 0x10, vec![0x7b]),
            Access::MmioRead(MMIO_BASE + 0x20, 4),
            Access::PioWrite(0x86, vec![0x0d, 0xf0, 0xfe, 0xca]),
            Access::PioRead(0x90, 1),
            Access::PioWrite(0x88, vec![0xff]),
            Access::MmioRead(MMIO_BASE + 0x100, 2),
            Access::PioWrite(0x8a, vec![0xff, 0xff]),
        ]
    );
    // Each read buffer arrived zeroed, whatever an earlier exit left in the kvm_run page.
    assert_eq!(*platform.reads_arrived_zeroed.lock().unwrap(), [true; 5]);
    // The VM counted the exits by reason, whoever handled them.
    let metrics = vm.vcpu_metrics();
    assert_eq!(metrics.exit_io_in.get(), 3);
    assert_eq!(metrics.exit_io_out.get(), 5);
    assert_eq!(metrics.exit_mmio_read.get(), 2);
    assert_eq!(metrics.exit_mmio_write.get(), 2);
    assert_eq!(metrics.failures.get(), 0);
}
