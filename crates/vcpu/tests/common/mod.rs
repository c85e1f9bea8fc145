//! Tiny guests for the tests that run on /dev/kvm: guest memory with code at [`CODE_ADDR`], a
//! recording device on the I/O ports [`PORTS`] and one at the start of the MMIO gap, and the CPU
//! states that enter the code in real mode or in 64-bit long mode.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_boot::cpu::{CpuState, DescriptorTable, Segment};
use ember_bus::{BusDeviceMut, BusRange, MmioBus, PioBus};
use ember_memory::layout::MMIO32_START;
use ember_vcpu::bus::BusExitHandler;
use ember_vcpu::vm::VmOptions;
use ember_vcpu::{Kvm, Vcpu, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the guest code is loaded and entered.
pub const CODE_ADDR: u64 = 0x1000;
/// Guest RAM size: 2 MiB from address 0.
pub const RAM_SIZE: usize = 0x20_0000;
/// The ports the port recorder answers: 0x80 to 0x8f.
pub const PORTS: u64 = 0x80;
/// The MMIO recorder's range.
pub const MMIO_BASE: u64 = MMIO32_START;
pub const MMIO_SIZE: u64 = 0x1000;
/// Long mode: the GDT, the (empty) IDT and the page tables.
const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

/// Records the accesses it sees; reads return the low bytes of `read_value`.
#[derive(Debug, Default)]
pub struct Recorder {
    /// (address, bytes) of every write.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// (address, length) of every read.
    pub reads: Vec<(u64, usize)>,
    /// What reads return.
    pub read_value: u64,
}

impl BusDeviceMut for Recorder {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let len = data.len();
        data.copy_from_slice(&self.read_value.to_le_bytes()[..len]);
        self.reads.push((base + offset, len));
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.writes.push((base + offset, data.to_vec()));
    }
}

/// A VM with guest code loaded and the two recorders on its buses.
pub struct TestVm {
    pub memory: Arc<GuestMemoryMmap>,
    pub vm: Vm,
    pub ports: Arc<Mutex<Recorder>>,
    pub mmio: Arc<Mutex<Recorder>>,
    /// The buses, as the vCPUs' exit handler.
    pub handler: Arc<BusExitHandler>,
}

impl TestVm {
    /// A VM whose memory holds `code` at [`CODE_ADDR`].
    pub fn new(code: &[u8]) -> Self {
        let memory =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap());
        memory.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
        Self::with_memory(memory)
    }

    /// A VM on `memory`, as it is.
    pub fn with_memory(memory: Arc<GuestMemoryMmap>) -> Self {
        Self::with_options(memory, VmOptions::default())
    }

    /// A VM on `memory`, made with `options`.
    pub fn with_options(memory: Arc<GuestMemoryMmap>, options: VmOptions) -> Self {
        let kvm = Kvm::new().unwrap();
        let vm = Vm::new_with(&kvm, memory.clone(), options).unwrap();
        let ports = Arc::new(Mutex::new(Recorder::default()));
        let mmio = Arc::new(Mutex::new(Recorder::default()));
        let mut pio_bus = PioBus::new();
        pio_bus
            .insert(BusRange::new(PORTS, 0x10).unwrap(), ports.clone())
            .unwrap();
        let mut mmio_bus = MmioBus::new();
        mmio_bus
            .insert(BusRange::new(MMIO_BASE, MMIO_SIZE).unwrap(), mmio.clone())
            .unwrap();
        TestVm {
            memory,
            vm,
            ports,
            mmio,
            handler: Arc::new(BusExitHandler::new(Arc::new(pio_bus), Arc::new(mmio_bus))),
        }
    }

    /// vCPU `index` of `count`, on the VM's buses.
    pub fn vcpu(&self, index: u8, count: u8) -> Vcpu {
        Vcpu::new(&self.vm, index, count, self.handler.clone()).unwrap()
    }

    pub fn ports(&self) -> MutexGuard<'_, Recorder> {
        self.ports.lock().unwrap()
    }

    pub fn mmio(&self) -> MutexGuard<'_, Recorder> {
        self.mmio.lock().unwrap()
    }

    /// The bytes written to port `port`, one entry per write.
    pub fn port_writes(&self, port: u64) -> Vec<Vec<u8>> {
        self.ports()
            .writes
            .iter()
            .filter(|(addr, _)| *addr == port)
            .map(|(_, data)| data.clone())
            .collect()
    }

    /// Builds the GDT, an empty IDT and page tables identity-mapping the first 4 GiB with 2 MiB
    /// pages, and returns the state that enters [`CODE_ADDR`] in 64-bit mode.
    pub fn long_mode_state(&self) -> CpuState {
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, entry) in gdt.iter().enumerate() {
            self.write_u64(GDT_ADDR + 8 * i as u64, *entry);
        }
        self.write_u64(IDT_ADDR, 0);
        self.write_u64(PML4_ADDR, PDPT_ADDR | 0x3);
        for i in 0..4u64 {
            let pd = PD_ADDR + i * 0x1000;
            self.write_u64(PDPT_ADDR + 8 * i, pd | 0x3);
            for j in 0..512u64 {
                let page = ((i << 9) | j) << 21;
                self.write_u64(pd + 8 * j, page | 0x83);
            }
        }

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
        let mut state = CpuState::default();
        state.regs.rip = CODE_ADDR;
        state.regs.rflags = 0x2;
        let sregs = &mut state.sregs;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = Segment {
            selector: 0,
            limit: 0xfff,
            type_: 0xb,
            s: false,
            l: false,
            granularity: false,
            ..code
        };
        sregs.ldt = Segment {
            type_: 0x2,
            present: true,
            limit: 0xffff,
            ..Segment::default()
        };
        sregs.gdt = DescriptorTable {
            base: GDT_ADDR,
            limit: (gdt.len() * 8 - 1) as u16,
        };
        // An IDT of a single byte: every exception escalates to a triple fault.
        sregs.idt = DescriptorTable {
            base: IDT_ADDR,
            limit: 0,
        };
        sregs.cr0 = 0x8000_0011; // PG, ET, PE
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 0x20; // PAE
        sregs.efer = 0x500; // LMA, LME
        state
    }

    pub fn write_u64(&self, addr: u64, value: u64) {
        self.memory.write_obj(value, GuestAddress(addr)).unwrap();
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.memory.read_obj(GuestAddress(addr)).unwrap()
    }
}

/// Puts `vcpu` in real mode at [`CODE_ADDR`], with the code segment at 0.
pub fn enter_real_mode(vcpu: &Vcpu) {
    let mut state = vcpu.cpu_state().unwrap();
    state.sregs.cs.base = 0;
    state.sregs.cs.selector = 0;
    state.regs.rip = CODE_ADDR;
    vcpu.set_boot_state(&state).unwrap();
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    condition()
}
