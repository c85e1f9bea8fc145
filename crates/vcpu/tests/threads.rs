//! vCPUs on their own threads: kicks, pause and resume, stop, and VM exits reported to the VMM.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestVm, enter_real_mode, wait_for};
use ember_bus::{BusDevice, BusRange, MmioBus, PioBus};
use ember_vcpu::bus::BusExitHandler;
use ember_vcpu::{RunState, Vcpu, VmExit, VmExitNotifier};
use vm_memory::{Bytes, GuestAddress};

/// Generous bound for things that take microseconds, so that a loaded machine does not fail the
/// tests; they assert that something happens, not how fast.
const PATIENCE: Duration = Duration::from_secs(20);

/// Records the name of the thread that writes to it.
struct ThreadNames(Arc<Mutex<Vec<String>>>);

impl BusDevice for ThreadNames {
    fn read(&self, _: u64, _: u64, _: &mut [u8]) {}
    fn write(&self, _: u64, _: u64, _: &[u8]) {
        let name = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        self.0.lock().unwrap().push(name);
    }
}

#[test]
fn devices_run_on_a_thread_named_after_the_vcpu() {
    // out 0x80, al; cli; hlt
    let guest = TestVm::new(&[0xe6, 0x80, 0xfa, 0xf4]);
    let names = Arc::new(Mutex::new(Vec::new()));
    let mut pio = PioBus::new();
    pio.insert(
        BusRange::new(0x80, 1).unwrap(),
        Arc::new(ThreadNames(names.clone())),
    )
    .unwrap();
    let handler = BusExitHandler::new(Arc::new(pio), Arc::new(MmioBus::new()));
    let vcpu = Vcpu::new(&guest.vm, 0, 1, Arc::new(handler)).unwrap();
    enter_real_mode(&vcpu);
    let handle = vcpu.start(VmExitNotifier::new().unwrap()).unwrap();
    assert!(wait_for(PATIENCE, || !names.lock().unwrap().is_empty()));
    handle.stop().unwrap();
    assert_eq!(*names.lock().unwrap(), ["ember_vcpu0"]);
}

#[test]
fn the_thread_start_hook_runs_on_the_vcpu_thread_before_the_guest() {
    // out 0x80, al; cli; hlt
    let guest = TestVm::new(&[0xe6, 0x80, 0xfa, 0xf4]);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let ran_on = Arc::new(Mutex::new(None));
    let hook = Box::new({
        let ran_on = ran_on.clone();
        let writes = guest.port_writes(0x80).len();
        move || {
            // The guest has not run yet.
            assert_eq!(writes, 0);
            *ran_on.lock().unwrap() = std::thread::current().name().map(str::to_string);
            Ok(())
        }
    });
    let handle = vcpu
        .start_with_hook(VmExitNotifier::new().unwrap(), Some(hook))
        .unwrap();
    assert!(wait_for(PATIENCE, || !guest.port_writes(0x80).is_empty()));
    handle.stop().unwrap();
    assert_eq!(ran_on.lock().unwrap().as_deref(), Some("ember_vcpu0"));
}

#[test]
fn a_failing_thread_start_hook_ends_the_vm_before_the_guest_runs() {
    // out 0x80, al; cli; hlt
    let guest = TestVm::new(&[0xe6, 0x80, 0xfa, 0xf4]);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let notifier = VmExitNotifier::new().unwrap();
    let hook = Box::new(|| Err(std::io::Error::other("no filter")));
    let handle = vcpu.start_with_hook(notifier.clone(), Some(hook)).unwrap();
    assert_eq!(
        notifier.wait_timeout(PATIENCE),
        Some(VmExit::Error(
            "vCPU 0: The thread-start hook failed: no filter".to_string()
        ))
    );
    assert!(wait_for(PATIENCE, || handle.state() == RunState::Exited));
    handle.stop().unwrap();
    assert!(guest.port_writes(0x80).is_empty());
}

#[test]
fn stop_kicks_a_vcpu_halted_inside_kvm() {
    // mov al, 0x42; out 0x80, al; cli; hlt
    let guest = TestVm::new(&[0xb0, 0x42, 0xe6, 0x80, 0xfa, 0xf4]);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    assert_eq!(handle.index(), 0);
    assert!(wait_for(PATIENCE, || !guest.port_writes(0x80).is_empty()));
    // With interrupts off, only a kick can end the halt.
    handle.stop().unwrap();
    assert_eq!(guest.port_writes(0x80), [vec![0x42]]);
    assert_eq!(notifier.exit(), None);
}

#[test]
fn spinning_vcpu_is_paused_resumed_and_stopped() {
    let code = [
        0xe6, 0x80, // again: out 0x80, al
        0xfe, 0xc0, // inc al
        0xeb, 0xfa, // jmp again
    ];
    let guest = TestVm::new(&code);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    assert!(wait_for(PATIENCE, || guest.port_writes(0x80).len() > 3));

    handle.kick();
    assert!(wait_for(PATIENCE, || guest.port_writes(0x80).len() > 6));
    assert_eq!(handle.state(), RunState::Running);

    handle.pause();
    assert_eq!(handle.state(), RunState::Paused);
    let paused_at = guest.port_writes(0x80).len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.port_writes(0x80).len(),
        paused_at,
        "a paused vCPU runs no guest code"
    );

    handle.resume();
    assert!(wait_for(PATIENCE, || guest.port_writes(0x80).len() > paused_at));
    assert_eq!(handle.state(), RunState::Running);

    let start = Instant::now();
    handle.stop().unwrap();
    assert!(start.elapsed() < PATIENCE);
    // The guest counted up one by one: no write was lost or repeated around the kicks.
    let writes = guest.port_writes(0x80);
    for (i, write) in writes.iter().enumerate() {
        assert_eq!(write[0], i as u8, "write {i}");
    }
    assert_eq!(notifier.exit(), None);
}

#[test]
fn repeated_pauses_never_miss_the_vcpu() {
    // Every pause must take the vCPU out of the guest, however the kick falls relative to the
    // thread entering KVM_RUN: the halted guest below never leaves KVM on its own.
    let guest = TestVm::new(&[0xfa, 0xf4]); // cli; hlt
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let handle = vcpu.start(VmExitNotifier::new().unwrap()).unwrap();
    for _ in 0..200 {
        handle.pause();
        assert_eq!(handle.state(), RunState::Paused);
        handle.resume();
        // Pause next while the thread is on its way back into the guest, or inside it.
        assert!(wait_for(PATIENCE, || handle.state() == RunState::Running));
    }
    handle.stop().unwrap();
}

#[test]
fn triple_fault_on_a_vcpu_thread_notifies_a_reset() {
    let guest = TestVm::new(&[0x0f, 0x0b]); // ud2
    let vcpu = guest.vcpu(0, 1);
    vcpu.set_boot_state(&guest.long_mode_state()).unwrap();
    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    assert_eq!(notifier.wait_timeout(PATIENCE), Some(VmExit::Reset));
    assert_eq!(notifier.event_fd().read().unwrap(), 1);
    assert!(wait_for(PATIENCE, || handle.state() == RunState::Exited));
    // Pausing or kicking an exited vCPU returns at once.
    handle.pause();
    handle.kick();
    handle.stop().unwrap();
}

#[test]
fn kvm_failure_on_a_vcpu_thread_notifies_an_error_naming_cause_and_rip() {
    let code = [
        0xf0, 0x48, 0x0f, 0xc7, 0x0e, // lock cmpxchg16b [rsi]
        0x0f, 0x0b, // ud2: a host that runs the instruction shuts down here
    ];
    let guest = TestVm::new(&code);
    let vcpu = guest.vcpu(0, 1);
    let mut state = guest.long_mode_state();
    state.regs.rsi = 0x3000;
    vcpu.set_boot_state(&state).unwrap();
    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    match notifier.wait_timeout(PATIENCE).expect("the VM ends") {
        VmExit::Error(message) => assert_eq!(
            message,
            "vCPU 0: KVM could not emulate the instruction at guest RIP 0x1000 \
             (emulation failure)"
        ),
        // A host that runs the guest natively reaches the triple fault after it.
        VmExit::Reset => assert_eq!(guest.read_u64(0x3000), 0),
        other => panic!("unexpected VM exit {other:?}"),
    }
    handle.stop().unwrap();
}

#[test]
fn first_vm_exit_wins_and_the_vmm_stops_the_other_vcpus() {
    // vCPU 0 halts with interrupts off; vCPU 1 triple-faults.
    let guest = TestVm::new(&[0xfa, 0xf4]);
    guest
        .memory
        .write_slice(&[0x0f, 0x0b], GuestAddress(0x2000))
        .unwrap();
    let notifier = VmExitNotifier::new().unwrap();
    let halted = guest.vcpu(0, 2);
    enter_real_mode(&halted);
    let faulting = guest.vcpu(1, 2);
    let mut state = guest.long_mode_state();
    state.regs.rip = 0x2000;
    faulting.set_boot_state(&state).unwrap();

    let handles = [
        halted.start(notifier.clone()).unwrap(),
        faulting.start(notifier.clone()).unwrap(),
    ];
    // The halt shuts the VM down and the triple fault resets it: whichever came first wins.
    let first = notifier.wait_timeout(PATIENCE).expect("the VM ends");
    assert!(
        matches!(first, VmExit::Shutdown | VmExit::Reset),
        "{first:?}"
    );
    // What the VMM does then: stop every vCPU, including the halted one.
    for handle in handles {
        handle.stop().unwrap();
    }
    assert!(!notifier.notify(VmExit::Error("too late".into())));
    assert_eq!(notifier.exit(), Some(first));
}

#[test]
fn vcpu_threads_keep_guest_memory_mapped_after_the_vm_is_dropped() {
    let code = [
        0xe6, 0x80, // again: out 0x80, al
        0xeb, 0xfc, // jmp again
    ];
    let guest = TestVm::new(&code);
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let handle = vcpu.start(VmExitNotifier::new().unwrap()).unwrap();
    let TestVm {
        memory, vm, ports, ..
    } = guest;
    drop(vm);
    // Only the vCPU holds the memory besides this test now.
    assert_eq!(Arc::strong_count(&memory), 2);
    drop(memory);
    // The guest goes on running from its memory.
    let seen = ports.lock().unwrap().writes.len();
    assert!(wait_for(PATIENCE, || ports.lock().unwrap().writes.len() > seen + 3));
    handle.stop().unwrap();
}

#[test]
fn dropping_a_handle_stops_its_vcpu() {
    let guest = TestVm::new(&[0xeb, 0xfe]); // jmp $
    let vcpu = guest.vcpu(0, 1);
    enter_real_mode(&vcpu);
    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    drop(handle);
    assert_eq!(notifier.exit(), None);
}
