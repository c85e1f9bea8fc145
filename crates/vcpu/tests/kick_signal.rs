//! A VMM that chooses its own kick signal: vCPU threads are paused and stopped with it. The
//! kick signal is process-wide, so this file holds a single test, in a process of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_vcpu::runner::Error;
use ember_vcpu::{
    ExitHandler, Kvm, RunState, Vcpu, Vm, VmExitNotifier, kick_signal, set_kick_signal,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::SIGRTMIN;

/// Generous bound for things that take microseconds.
const PATIENCE: Duration = Duration::from_secs(20);

/// Counts port writes.
#[derive(Default)]
struct Writes(AtomicUsize);

impl ExitHandler for Writes {
    fn pio_read(&self, _: u16, _: &mut [u8]) {}
    fn pio_write(&self, _: u16, _: &[u8]) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) {}
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// The handler `signal` has in this process, as `sigaction` reports it.
fn disposition(signal: i32) -> libc::sighandler_t {
    // SAFETY: all-zero bytes are a valid `sigaction`, a plain C struct.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `action` is a valid place for the old one.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut action) };
    assert_eq!(rc, 0, "sigaction({signal})");
    action.sa_sigaction
}

#[test]
fn a_chosen_kick_signal_pauses_and_stops_the_vcpus() {
    let chosen = SIGRTMIN() + 2;
    set_kick_signal(chosen).unwrap();
    assert_eq!(kick_signal(), chosen);

    // out 0x80, al; cli; hlt: the vCPU halts inside KVM_RUN, where only a signal reaches it.
    let memory =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    memory
        .write_slice(&[0xe6, 0x80, 0xfa, 0xf4], GuestAddress(0x1000))
        .unwrap();
    let vm = Vm::new(&Kvm::new().unwrap(), memory).unwrap();
    let writes = Arc::new(Writes::default());
    let vcpu = Vcpu::new(&vm, 0, 1, writes.clone()).unwrap();
    let mut state = vcpu.cpu_state().unwrap();
    state.sregs.cs.base = 0;
    state.sregs.cs.selector = 0;
    state.regs.rip = 0x1000;
    vcpu.set_boot_state(&state).unwrap();

    let notifier = VmExitNotifier::new().unwrap();
    let handle = vcpu.start(notifier.clone()).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while writes.0.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let it reach the `hlt`.
    std::thread::sleep(Duration::from_millis(50));

    // The handler is on the chosen signal; SIGRTMIN, whose default action would kill this
    // process, was left alone.
    assert_ne!(disposition(chosen), libc::SIG_DFL);
    assert_eq!(disposition(SIGRTMIN()), libc::SIG_DFL);

    // Pausing takes the halted vCPU out of KVM_RUN, which only the kick signal can do.
    let paused = Arc::new(Mutex::new(handle));
    let pauser = std::thread::spawn({
        let paused = paused.clone();
        move || {
            let handle = paused.lock().unwrap();
            handle.pause();
            handle.state()
        }
    });
    let deadline = Instant::now() + PATIENCE;
    while !pauser.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the vCPU did not leave the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(pauser.join().unwrap(), RunState::Paused);
    let handle = Arc::into_inner(paused).unwrap().into_inner().unwrap();
    handle.resume();
    handle.stop().unwrap();
    assert_eq!(notifier.exit(), None);

    // The signal is fixed once a vCPU has started: choosing it again is fine, another is not.
    set_kick_signal(chosen).unwrap();
    let err = set_kick_signal(chosen + 1).unwrap_err();
    assert!(
        matches!(err, Error::KickSignalInUse { current } if current == chosen),
        "{err}"
    );
    assert_eq!(kick_signal(), chosen);
}
