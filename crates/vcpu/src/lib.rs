//! KVM virtual machines and vCPU threads for x86_64 guests.
//!
//! This crate is where ember meets KVM. A [`Vm`] registers guest memory with KVM and creates the
//! in-kernel interrupt controllers and timer; a [`Vcpu`] is one virtual CPU with the CPUID, MSRs,
//! local APIC and FPU state a Linux guest expects, plus the [`ExitHandler`] its port and MMIO
//! accesses go to. [`Vcpu::run_once`] enters the guest and turns the next exit into a
//! [`VcpuEvent`], having already given port and MMIO accesses to the handler; [`Vcpu::start`]
//! runs that loop on a thread of its own, controlled through a [`VcpuHandle`] (pause, resume,
//! kick, stop), and reports the end of the VM (reset, shutdown, a KVM failure naming its cause
//! and the guest RIP) through a [`VmExitNotifier`].
//!
//! The VMM owns its devices: it implements [`ExitHandler`] over its own bus, or, with the `bus`
//! feature, uses `bus::BusExitHandler` over ember's. The signal that kicks vCPU threads is
//! `SIGRTMIN` unless chosen with [`set_kick_signal`].
//!
//! # Snapshots
//!
//! [`Vm::save_state`] and [`Vcpu::save_state`] read what KVM keeps of the VM and of each vCPU
//! into [`VmState`] and [`vcpu::VcpuState`], serde data; [`Vm::restore_state`] and
//! [`Vcpu::restore_state`] load them into a new VM, which goes on from where the saved one was.
//! A running VMM saves a paused vCPU through its thread with [`VcpuHandle::save_state`], and
//! starts restored vCPUs paused with [`runner::StartOptions`]. [`compat`] tells whether a saved
//! vCPU can run on this host; [`VmOptions::track_dirty_pages`] and [`Vm::dirty_log`] give the
//! pages the guest wrote, for diff snapshots. The README has an example.
//!
//! Boot-time register state comes from [`ember_boot::cpu::CpuState`], plain data that this crate
//! loads into the vCPU with [`Vcpu::set_boot_state`].
//!
//! # Features
//!
//! - `bus` (off by default): `bus::BusExitHandler`, the [`ExitHandler`] over ember-bus's
//!   `PioBus` and `MmioBus`. Off so that a VMM with a bus of its own does not build ours.
//!
//! # Example
//!
//! A guest of four instructions in real mode writes `E` to the COM1 port and halts:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ember_vcpu::{ExitHandler, Kvm, Vcpu, VcpuEvent, Vm, VmExitNotifier};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! /// A console on COM1: collects the bytes written to its data port.
//! #[derive(Default)]
//! struct Console(Mutex<Vec<u8>>);
//!
//! impl ExitHandler for Console {
//!     fn pio_read(&self, _port: u16, data: &mut [u8]) {
//!         data.fill(0xff);
//!     }
//!     fn pio_write(&self, port: u16, data: &[u8]) {
//!         if port == 0x3f8 {
//!             self.0.lock().unwrap().extend_from_slice(data);
//!         }
//!     }
//!     fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
//!         data.fill(0xff);
//!     }
//!     fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
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
//! let console = Arc::new(Console::default());
//! let mut vcpu = Vcpu::new(&vm, 0, 1, console.clone())?;
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
//! assert_eq!(*console.0.lock().unwrap(), b"E");
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

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(feature = "bus")]
pub mod bus;
pub mod compat;
mod cpuid;
pub mod exit;
pub mod metrics;
mod msr;
mod regs;
pub mod runner;
pub mod vcpu;
pub mod vm;

pub use exit::ExitHandler;
pub use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
pub use metrics::VcpuMetrics;
pub use runner::{
    RunState, StartOptions, ThreadHook, VcpuHandle, VmExit, VmExitNotifier, kick_signal,
    set_kick_signal,
};
pub use vcpu::{SystemEvent, Vcpu, VcpuEvent};
pub use vm::{Vm, VmOptions, VmState};
