//! KVM virtual machines and vCPU threads for x86_64 guests.
//!
//! This crate is where ember meets KVM. A [`Vm`] registers guest memory with KVM and creates the
//! in-kernel interrupt controllers and timer; a [`Vcpu`] is one virtual CPU with the CPUID, MSRs,
//! local APIC and FPU state a Linux guest expects, plus the buses its port and MMIO accesses go
//! to. [`Vcpu::run_once`] enters the guest and turns the next exit into a [`VcpuEvent`], having
//! already dispatched port and MMIO accesses to the devices; [`Vcpu::start`] runs that loop on a
//! thread of its own, controlled through a [`VcpuHandle`] (pause, resume, kick, stop), and
//! reports the end of the VM (reset, shutdown, a KVM failure naming its cause and the guest RIP)
//! through a [`VmExitNotifier`].
//!
//! Boot-time register state comes from [`ember_boot::cpu::CpuState`], plain data that this crate
//! loads into the vCPU with [`Vcpu::set_boot_state`].
//!
//! # Example
//!
//! A guest of four instructions in real mode writes `E` to the COM1 port and halts:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_bus::{BusDeviceMut, BusRange, MmioBus, PioBus};
//! use ember_vcpu::{Kvm, Vcpu, VcpuEvent, Vm, VmExitNotifier};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! /// Collects the bytes written to it.
//! #[derive(Default)]
//! struct Console(Vec<u8>);
//!
//! impl BusDeviceMut for Console {
//!     fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
//!         data.fill(0);
//!     }
//!     fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
//!         if offset == 0 {
//!             self.0.extend_from_slice(data);
//!         }
//!     }
//! }
//!
//! // mov dx, 0x3f8; mov al, 'E'; out dx, al; hlt
//! const CODE: [u8; 6] = [0xba, 0xf8, 0x03, 0xb0, b'E', 0xee];
//! const HLT: u8 = 0xf4;
//!
//! let memory = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])?);
//! memory.write_slice(&CODE, GuestAddress(0x1000))?;
//! memory.write_obj(HLT, GuestAddress(0x1006))?;
//!
//! let kvm = Kvm::new()?;
//! let vm = Vm::new(&kvm, memory)?;
//! let console = Arc::new(Mutex::new(Console::default()));
//! let mut pio = PioBus::new();
//! pio.insert(BusRange::new(0x3f8, 8)?, console.clone())?;
//! let mut vcpu = Vcpu::new(&vm, 0, 1, Arc::new(pio), Arc::new(MmioBus::new()))?;
//!
//! // Start from the reset state, in real mode, with the code segment at 0.
//! let mut state = vcpu.cpu_state()?;
//! state.sregs.cs.base = 0;
//! state.sregs.cs.selector = 0;
//! state.regs.rip = 0x1000;
//! vcpu.set_boot_state(&state)?;
//!
//! // One step: the `out` reaches the console.
//! assert_eq!(vcpu.run_once()?, VcpuEvent::IoOut { port: 0x3f8, len: 1 });
//! assert_eq!(console.lock().unwrap().0, b"E");
//!
//! // On a thread of its own the vCPU halts inside KVM, waiting for an interrupt; stopping it
//! // kicks it out.
//! let notifier = VmExitNotifier::new()?;
//! let handle = vcpu.start(notifier.clone())?;
//! handle.stop()?;
//! assert_eq!(notifier.exit(), None, "a stopped vCPU has not ended the VM");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod cpuid;
pub mod metrics;
mod regs;
pub mod runner;
pub mod vcpu;
pub mod vm;

pub use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
pub use metrics::VcpuMetrics;
pub use runner::{ThreadHook, VcpuHandle, VcpuState, VmExit, VmExitNotifier, kick_signal};
pub use vcpu::{SystemEvent, Vcpu, VcpuEvent};
pub use vm::Vm;
