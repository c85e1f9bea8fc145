//! Snapshots: a VM's and its vCPUs' states saved, and loaded into a new VM that goes on from
//! where the first one was.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RAM_SIZE, TestVm, enter_real_mode, wait_for};
use ember_vcpu::compat::{self, CpuidRegister, HostCpu, MissingFeature};
use ember_vcpu::runner::{self, StartOptions};
use ember_vcpu::vcpu::{Error, FloatingPointState, VcpuState};
use ember_vcpu::{RunState, VcpuEvent, VmExitNotifier, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Counts in EAX and at [`COUNTER_ADDR`], and writes the low byte of each count to port 0x80:
/// `inc eax; mov [0x2000], eax; out 0x80, al; jmp start`.
const COUNTER: [u8; 10] = [0x66, 0x40, 0x66, 0xa3, 0x00, 0x20, 0xe6, 0x80, 0xeb, 0xf6];
const COUNTER_ADDR: u64 = 0x2000;
/// Where the counter loop starts, and where its `out` ends.
const LOOP_START: u64 = common::CODE_ADDR;
const AFTER_OUT: u64 = common::CODE_ADDR + 8;

/// Generous bound for things that take microseconds, so that a loaded machine does not fail the
/// tests.
const PATIENCE: Duration = Duration::from_secs(20);

/// A copy of `memory`, as a snapshot's memory file would give it back.
fn copy_memory(memory: &GuestMemoryMmap) -> Arc<GuestMemoryMmap> {
    let mut bytes = vec![0u8; RAM_SIZE];
    memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    Arc::new(copy)
}

fn counter_in_memory(guest: &TestVm) -> u32 {
    guest.memory.read_obj(GuestAddress(COUNTER_ADDR)).unwrap()
}

/// Runs the counter for `steps` counts and saves the VM and its vCPU.
fn counted(steps: u32) -> (TestVm, VmState, VcpuState) {
    let guest = TestVm::new(&COUNTER);
    let mut vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    for _ in 0..steps {
        assert_eq!(
            vcpu.run_once().unwrap(),
            VcpuEvent::IoOut { port: 0x80, len: 1 }
        );
    }
    let vcpu_state = vcpu.save_state().unwrap();
    let vm_state = guest.vm.save_state().unwrap();
    (guest, vm_state, vcpu_state)
}

#[test]
fn a_restored_vm_goes_on_counting_where_the_saved_one_was() {
    let (guest, vm_state, vcpu_state) = counted(100);
    assert_eq!(vcpu_state.regs.rax, 100);
    assert_eq!(counter_in_memory(&guest), 100);
    let memory = copy_memory(&guest.memory);
    // The saved VM is gone before the new one runs.
    drop(guest);

    let restored = TestVm::with_memory(memory);
    restored.vm.restore_state(&vm_state).unwrap();
    let mut vcpu = restored.vcpu(0, 1);
    vcpu.restore_state(&vcpu_state).unwrap();
    for _ in 0..3 {
        assert_eq!(
            vcpu.run_once().unwrap(),
            VcpuEvent::IoOut { port: 0x80, len: 1 }
        );
    }
    assert_eq!(restored.port_writes(0x80), [[101], [102], [103]]);
    assert_eq!(counter_in_memory(&restored), 103);
    assert_eq!(vcpu.save_state().unwrap().regs.rax, 103);
}

#[test]
fn saved_states_survive_serialization_unchanged() {
    let (_guest, vm_state, vcpu_state) = counted(5);
    let bytes = postcard::to_allocvec(&vcpu_state).unwrap();
    let decoded: VcpuState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, vcpu_state);
    let bytes = postcard::to_allocvec(&vm_state).unwrap();
    let decoded: VmState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, vm_state);
}

#[test]
fn a_saved_vcpu_holds_what_the_guest_needs() {
    let (_guest, _, state) = counted(1);
    // The boot MSRs are among the saved ones, with their values.
    let msr = |index| state.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    assert_eq!(msr(0x1a0), Some(1), "IA32_MISC_ENABLE");
    assert!(msr(0x10).is_some(), "IA32_TSC");
    assert!(msr(0xc000_0082).is_some(), "LSTAR");
    // The CPUID the vCPU was given, with KVM's signature and no empty entries.
    assert!(state.cpuid.iter().any(|e| e.function == 0x4000_0000));
    assert!(state.cpuid.iter().all(|e| e.function != 0 || e.eax != 0));
    assert!(matches!(state.fpu, FloatingPointState::Xsave(ref words) if words.len() >= 1024));
    assert!(state.tsc_khz.is_some());
}

/// Restores `state` into a fresh vCPU 0 and returns the error.
fn restore_error(state: &VcpuState) -> Error {
    let guest = TestVm::new(&COUNTER);
    let vcpu = guest.vcpu(0, 1);
    vcpu.restore_state(state).unwrap_err()
}

#[test]
fn a_state_with_a_bad_cpuid_count_is_refused() {
    let (_guest, _, mut state) = counted(1);
    let leaf = state.cpuid[0];
    state.cpuid = vec![leaf; 300];
    let err = restore_error(&state);
    assert!(matches!(err, Error::CpuidCount { count: 300, .. }), "{err}");
    state.cpuid.clear();
    assert!(matches!(
        restore_error(&state),
        Error::CpuidCount { count: 0, .. }
    ));
}

#[test]
fn a_state_with_a_bad_msr_count_or_index_is_refused() {
    let (_guest, _, mut state) = counted(1);
    let msr = state.msrs[0];
    let good = state.msrs.clone();
    state.msrs = vec![msr; 5000];
    assert!(matches!(
        restore_error(&state),
        Error::MsrCount { count: 5000, .. }
    ));
    state.msrs = good;
    // IA32_FEATURE_CONTROL is not for a snapshot to set.
    state.msrs[0].index = 0x3a;
    let err = restore_error(&state);
    assert!(matches!(err, Error::MsrNotRestorable { index: 0x3a }));
    assert_eq!(
        err.to_string(),
        "The saved vCPU state holds MSR 0x3a, which snapshots do not restore"
    );
}

#[test]
fn a_state_with_an_xsave_area_of_the_wrong_size_is_refused() {
    let (_guest, _, mut state) = counted(1);
    let FloatingPointState::Xsave(words) = &mut state.fpu else {
        panic!("this host has XSAVE");
    };
    let good = words.clone();
    words.truncate(10);
    assert!(matches!(
        restore_error(&state),
        Error::XsaveSize { len: 40, .. }
    ));
    let FloatingPointState::Xsave(words) = &mut state.fpu else {
        unreachable!()
    };
    *words = good;
    words.resize(1 << 20, 0);
    assert!(matches!(
        restore_error(&state),
        Error::XsaveSize { len: 0x40_0000, .. }
    ));
}

#[test]
fn a_state_of_another_vcpu_is_refused() {
    let (_guest, _, state) = counted(1);
    let guest = TestVm::new(&COUNTER);
    let _vcpu0 = guest.vcpu(0, 2);
    let vcpu1 = guest.vcpu(1, 2);
    assert!(matches!(
        vcpu1.restore_state(&state),
        Err(Error::ApicIdMismatch { saved: 0, index: 1 })
    ));
}

#[test]
fn a_vcpu_thread_saved_while_paused_goes_on_in_a_new_vm_started_paused() {
    let guest = TestVm::new(&COUNTER);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let handle = vcpu.start(VmExitNotifier::new().unwrap()).unwrap();
    assert!(wait_for(PATIENCE, || guest.port_writes(0x80).len() >= 100));

    // A running vCPU's state cannot be saved: refused at once, without waiting.
    let asked = Instant::now();
    assert!(matches!(
        handle.save_state(),
        Err(runner::Error::NotPaused {
            index: 0,
            state: RunState::Running
        })
    ));
    assert!(asked.elapsed() < Duration::from_secs(5));

    handle.pause();
    let vcpu_state = handle.save_state().unwrap();
    // Saving again gives the same state: the vCPU stayed paused.
    assert_eq!(handle.save_state().unwrap().regs, vcpu_state.regs);
    let vm_state = guest.vm.save_state().unwrap();
    let count = u32::try_from(vcpu_state.regs.rax).unwrap();
    assert!(count >= 100);
    // The pause may have caught the guest between its `inc` and its store.
    let rip = vcpu_state.regs.rip;
    let stored = counter_in_memory(&guest);
    assert!(stored == count || (stored + 1 == count && rip == LOOP_START + 2));
    let next_out = if rip > LOOP_START && rip < AFTER_OUT {
        count
    } else {
        count + 1
    };
    let memory = copy_memory(&guest.memory);
    handle.stop().unwrap();
    drop(guest);

    let restored = TestVm::with_memory(memory);
    restored.vm.restore_state(&vm_state).unwrap();
    let vcpu = restored.vcpu(0, 1);
    vcpu.restore_state(&vcpu_state).unwrap();
    let handle = vcpu
        .start_with(
            VmExitNotifier::new().unwrap(),
            StartOptions::new().paused(true),
        )
        .unwrap();
    assert_eq!(handle.state(), RunState::Paused);
    // Paused from the start: its state can be saved, and the guest does not run.
    assert_eq!(handle.save_state().unwrap().regs.rax, vcpu_state.regs.rax);
    std::thread::sleep(Duration::from_millis(50));
    assert!(restored.port_writes(0x80).is_empty());

    handle.resume();
    assert!(wait_for(PATIENCE, || restored.port_writes(0x80).len() >= 3));
    handle.pause();
    let writes = restored.port_writes(0x80);
    assert_eq!(writes[0], [next_out.to_le_bytes()[0]]);
    assert!(handle.save_state().unwrap().regs.rax > vcpu_state.regs.rax);
    handle.stop().unwrap();
}

#[test]
fn a_stopped_vcpu_thread_cannot_save() {
    let guest = TestVm::new(&COUNTER);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let notifier = VmExitNotifier::new().unwrap();
    let hook: runner::ThreadHook = Box::new(|| Err(std::io::Error::other("no")));
    let handle = vcpu
        .start_with(
            notifier.clone(),
            StartOptions::new().hook(hook).paused(true),
        )
        .unwrap();
    assert!(notifier.wait_timeout(PATIENCE).is_some());
    assert!(matches!(
        handle.save_state(),
        Err(runner::Error::NotPaused {
            state: RunState::Exited,
            ..
        })
    ));
}

#[test]
fn a_state_is_compatible_with_the_host_it_was_saved_on() {
    let (_guest, _, state) = counted(1);
    let target = TestVm::new(&COUNTER);
    target.vcpu(0, 1).check_compatible(&state).unwrap();
    let cpu = HostCpu::from_cpuid(&state.cpuid);
    let host = HostCpu::current();
    assert_eq!(cpu.vendor, host.vendor);
    assert_eq!((cpu.family, cpu.model), (host.family, host.model));
}

#[test]
fn a_state_whose_cpuid_claims_a_feature_the_host_lacks_is_refused_naming_it() {
    let (_guest, _, mut state) = counted(1);
    let target = TestVm::new(&COUNTER);
    let vcpu = target.vcpu(0, 1);
    let leaf7 = state
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .expect("leaf 7");
    let bit = (0..32u8).find(|bit| leaf7.ebx & (1 << bit) == 0).unwrap();
    leaf7.ebx |= 1 << bit;
    let err = vcpu.check_compatible(&state).unwrap_err();
    let compat::Error::MissingFeatures { missing } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        missing,
        &[MissingFeature {
            leaf: 7,
            subleaf: 0,
            register: CpuidRegister::Ebx,
            bit
        }]
    );
    assert!(
        err.to_string()
            .ends_with(&format!("CPUID leaf 0x7 subleaf 0 EBX bit {bit}")),
        "{err}"
    );
}
