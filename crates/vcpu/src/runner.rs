//! vCPU threads: one per vCPU, running the guest until told to stop or until the VM ends.
//!
//! [`Vcpu::start`] moves a vCPU onto a thread named `ember_vcpu{index}` that calls
//! [`Vcpu::run_once`] in a loop. The [`VcpuHandle`] it returns pauses, resumes, kicks and stops
//! the thread, and saves the state of a paused vCPU ([`VcpuHandle::save_state`]). A vCPU
//! thread can start paused ([`StartOptions::paused`]), so that a VM restored from a snapshot
//! runs only when resumed. A vCPU that ends the VM (reset, shutdown, a failure of KVM) tells the VMM through
//! the [`VmExitNotifier`] shared by all vCPUs, which keeps the first reason and signals an
//! [`EventFd`] the VMM's main loop can wait on.
//!
//! # Kicking a vCPU out of the guest
//!
//! A vCPU thread spends its time inside `KVM_RUN`, for example halted until an interrupt that
//! may never come. To make it return, the handle sets the `immediate_exit` byte of the vCPU's
//! `kvm_run` page and sends the thread the signal [`kick_signal`], whose handler does nothing: a
//! thread inside `KVM_RUN` leaves it because a signal is pending, and one about to enter it
//! returns at once because of `immediate_exit`, so no kick is lost in between. Because the
//! handler is installed without `SA_RESTART`, a system call a device makes on a vCPU thread may
//! fail with `EINTR`; the standard library retries those.
//!
//! The kick signal is a real-time signal, `SIGRTMIN` unless the VMM chose another with
//! [`set_kick_signal`]. The choice is process-wide, as signal handlers are: its handler is
//! installed the first time a vCPU starts, and from then on the signal is fixed and must not be
//! used for anything else. A VMM that already uses `SIGRTMIN` calls [`set_kick_signal`] before
//! it starts its first vCPU.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMAX, SIGRTMIN, register_signal_handler};

use crate::vcpu::{self, ImmediateExit, SystemEvent, Vcpu, VcpuEvent, VcpuState};

/// Errors of vCPU threads, of the kick signal and of the VM exit notifier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The handler of the kick signal could not be installed.
    #[error("Cannot install the handler of the vCPU kick signal {signal}")]
    RegisterSignalHandler {
        /// The kick signal.
        signal: c_int,
        /// The error of `sigaction`.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// The signal chosen to kick vCPUs is not a real-time signal.
    #[error("The vCPU kick signal must be a real-time signal ({min} to {max}), not {signal}")]
    NotRealTimeSignal {
        /// The signal chosen.
        signal: c_int,
        /// `SIGRTMIN`.
        min: c_int,
        /// `SIGRTMAX`.
        max: c_int,
    },
    /// A vCPU already started with another kick signal, whose handler is installed.
    #[error("The vCPU kick signal is already {current}, in use since a vCPU started")]
    KickSignalInUse {
        /// The signal in use.
        current: c_int,
    },
    /// The vCPU thread could not be created.
    #[error("Cannot start the thread of vCPU {index}")]
    SpawnThread {
        /// The vCPU index.
        index: u8,
        /// The error of the thread creation.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread panicked.
    #[error("The thread of vCPU {0} panicked")]
    ThreadPanicked(u8),
    /// The notifier's event file descriptor could not be created.
    #[error("Cannot create the VM exit event")]
    CreateEventFd(#[source] std::io::Error),
    /// A vCPU's state can only be saved while its thread is paused.
    #[error("vCPU {index} is {state:?}, not paused: its state cannot be saved")]
    NotPaused {
        /// The vCPU index.
        index: u8,
        /// What the thread was doing.
        state: RunState,
    },
    /// The paused vCPU thread could not save the vCPU's state.
    #[error("Cannot save the state of vCPU {index}")]
    SaveState {
        /// The vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: vcpu::Error,
    },
}

/// Result type of vCPU thread operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Code a new vCPU thread runs first, before it touches the vCPU or runs the guest: a VMM's
/// per-thread setup, such as installing a seccomp filter or pinning the thread to a host CPU.
/// An error stops the thread: the vCPU ends the VM with that error.
pub type ThreadHook = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// Why a vCPU ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExit {
    /// The guest reset the machine: a reset request, or a triple fault (`KVM_EXIT_SHUTDOWN`),
    /// which resets an x86 machine (Linux `reboot=t` resets that way).
    Reset,
    /// The guest shut the machine down: a power-off request, or a halt that nothing can end.
    Shutdown,
    /// The vCPU could not go on; the sentence says why and where.
    Error(String),
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => f.write_str("The guest asked for a reset"),
            VmExit::Shutdown => f.write_str("The guest shut down"),
            VmExit::Error(message) => f.write_str(message),
        }
    }
}

impl VcpuEvent {
    /// The VM exit this event calls for, or `None` when the vCPU goes on running.
    ///
    /// Port and MMIO accesses and interruptions do not end the VM; a reset request and a triple
    /// fault reset it; a power-off request and a halt without an in-kernel local APIC shut it down;
    /// internal errors, entry failures, unexpected exits and guest crashes are errors described
    /// by [`VcpuEvent::failure`].
    pub fn vm_exit(&self) -> Option<VmExit> {
        if let Some(failure) = self.failure() {
            return Some(VmExit::Error(failure));
        }
        match self {
            VcpuEvent::SystemEvent(SystemEvent::Reset) | VcpuEvent::Shutdown => Some(VmExit::Reset),
            VcpuEvent::SystemEvent(SystemEvent::Shutdown) | VcpuEvent::Hlt => {
                Some(VmExit::Shutdown)
            }
            _ => None,
        }
    }
}

/// Tells the VMM that a vCPU ended the VM, and why.
///
/// Clones share one state. The first [`notify`](VmExitNotifier::notify) stores its reason and
/// signals [`event_fd`](VmExitNotifier::event_fd); later ones are ignored, so the reason the
/// VMM reads is what ended the VM, not a consequence of stopping the other vCPUs.
#[derive(Debug, Clone)]
pub struct VmExitNotifier {
    inner: Arc<NotifierInner>,
}

#[derive(Debug)]
struct NotifierInner {
    event: EventFd,
    exit: Mutex<Option<VmExit>>,
    exited: Condvar,
}

impl VmExitNotifier {
    /// Creates a notifier with a non-blocking event file descriptor.
    ///
    /// # Errors
    ///
    /// [`Error::CreateEventFd`] when the eventfd cannot be created.
    pub fn new() -> Result<Self> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd)?;
        Ok(VmExitNotifier {
            inner: Arc::new(NotifierInner {
                event,
                exit: Mutex::new(None),
                exited: Condvar::new(),
            }),
        })
    }

    /// The event file descriptor written once, when the first reason arrives; for an epoll
    /// loop. Its counter is left for the VMM to read.
    pub fn event_fd(&self) -> &EventFd {
        &self.inner.event
    }

    /// Records `exit` unless a reason is already recorded, and signals the event. Returns
    /// whether `exit` was the first reason. Devices may call it too, for example a keyboard
    /// controller asked for a reset.
    pub fn notify(&self, exit: VmExit) -> bool {
        let mut slot = lock(&self.inner.exit);
        if slot.is_some() {
            return false;
        }
        *slot = Some(exit);
        self.inner.exited.notify_all();
        if let Err(err) = self.inner.event.write(1) {
            // Only a counter at its maximum fails a write, and this is the only write.
            log::error!("Cannot signal the VM exit event: {err}");
        }
        true
    }

    /// The recorded reason, if any.
    pub fn exit(&self) -> Option<VmExit> {
        lock(&self.inner.exit).clone()
    }

    /// Blocks until a reason is recorded and returns it.
    pub fn wait(&self) -> VmExit {
        let slot = lock(&self.inner.exit);
        let slot = self
            .inner
            .exited
            .wait_while(slot, |exit| exit.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        // `wait_while` returned, so the slot holds a reason.
        slot.clone().expect("the VM exit reason is recorded")
    }

    /// Blocks until a reason is recorded or `timeout` passes; returns the reason, if any.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let slot = lock(&self.inner.exit);
        let (slot, _) = self
            .inner
            .exited
            .wait_timeout_while(slot, timeout, |exit| exit.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        slot.clone()
    }
}

/// What a vCPU thread is doing, as seen from its handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunState {
    /// Running the guest, or about to.
    Running,
    /// Waiting for [`VcpuHandle::resume`], out of the guest.
    Paused,
    /// The thread's loop has ended: stopped, or the vCPU ended the VM.
    Exited,
}

/// How a vCPU thread starts: [`Vcpu::start_with`].
///
/// # Example
///
/// ```no_run
/// # fn f(vcpu: ember_vcpu::Vcpu, notifier: ember_vcpu::VmExitNotifier)
/// # -> Result<(), ember_vcpu::runner::Error> {
/// use ember_vcpu::runner::StartOptions;
///
/// // A vCPU restored from a snapshot: its thread waits for `resume`.
/// let handle = vcpu.start_with(notifier, StartOptions::new().paused(true))?;
/// handle.resume();
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
#[non_exhaustive]
pub struct StartOptions {
    /// Run first on the new thread, see [`ThreadHook`].
    pub hook: Option<ThreadHook>,
    /// Start paused: the thread (after the hook) waits for [`VcpuHandle::resume`] before it
    /// runs the guest.
    pub paused: bool,
}

impl StartOptions {
    /// Start running, with no hook.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `hook` first on the new thread.
    pub fn hook(mut self, hook: ThreadHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Starts paused, or not.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }
}

impl fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartOptions")
            .field("hook", &self.hook.is_some())
            .field("paused", &self.paused)
            .finish()
    }
}

/// A save of the vCPU's state asked of its paused thread.
#[derive(Debug, Default)]
enum SaveSlot {
    /// No save asked for.
    #[default]
    Idle,
    /// A handle asked for one and waits.
    Requested,
    /// The thread saved; the handle takes the result.
    Done(Box<vcpu::Result<VcpuState>>),
}

/// What the handle asks of the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// State shared by a vCPU thread and its handle, under one lock.
#[derive(Debug)]
struct Shared {
    request: Request,
    state: RunState,
    /// A save asked of the paused thread, and its result.
    save: SaveSlot,
    /// The vCPU's `immediate_exit` byte while the thread holds the vCPU; `None` before the
    /// thread starts and after it lets go of the vCPU. Only set or cleared under the lock, so a
    /// kick that finds it `Some` knows the vCPU, and the mapping, are alive while it holds the
    /// lock.
    immediate_exit: Option<ImmediateExit>,
}

#[derive(Debug)]
struct Control {
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Waits while a pause is requested, saving `vcpu`'s state when a handle asks; returns
    /// whether the thread should run the guest (`false`: stop).
    ///
    /// Entering the pause, it tells a guest with kvmclock that it is paused.
    fn wait_runnable(&self, vcpu: &mut Vcpu) -> bool {
        let mut shared = self.lock();
        loop {
            match shared.request {
                Request::Run => {
                    if shared.state != RunState::Running {
                        shared.state = RunState::Running;
                        self.changed.notify_all();
                    }
                    return true;
                }
                Request::Stop => return false,
                Request::Pause => {
                    if shared.state != RunState::Paused {
                        vcpu.notify_guest_paused();
                        shared.state = RunState::Paused;
                        self.changed.notify_all();
                    }
                    if matches!(shared.save, SaveSlot::Requested) {
                        shared.save = SaveSlot::Done(Box::new(vcpu.save_state()));
                        self.changed.notify_all();
                    }
                    shared = self
                        .changed
                        .wait(shared)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

/// Locks `mutex`, going on with the data as it is if a thread panicked while holding it: every
/// state this crate keeps under a lock is valid between any two of its writes.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process's kick signal: the one chosen, and whether its handler is installed.
#[derive(Debug)]
struct KickSignal {
    /// `None` until [`set_kick_signal`]: `SIGRTMIN`.
    chosen: Option<c_int>,
    /// Set once the handler is installed; the signal is fixed from then on.
    installed: bool,
}

static KICK_SIGNAL: Mutex<KickSignal> = Mutex::new(KickSignal {
    chosen: None,
    installed: false,
});

impl KickSignal {
    fn signal(&self) -> c_int {
        self.chosen.unwrap_or_else(SIGRTMIN)
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`: `SIGRTMIN`, or the one chosen with
/// [`set_kick_signal`].
pub fn kick_signal() -> c_int {
    lock(&KICK_SIGNAL).signal()
}

/// Chooses the real-time signal that kicks vCPU threads out of `KVM_RUN`, for the whole
/// process, in place of `SIGRTMIN`. Call it before the first vCPU starts: the first
/// [`Vcpu::start`] installs the signal's handler, and the signal is fixed from then on.
///
/// # Errors
///
/// [`Error::NotRealTimeSignal`] when `signal` is not between `SIGRTMIN` and `SIGRTMAX`;
/// [`Error::KickSignalInUse`] when a vCPU has already started with another signal (choosing
/// the signal in use is fine).
///
/// # Example
///
/// ```
/// use ember_vcpu::runner::{Error, kick_signal, set_kick_signal};
/// use vmm_sys_util::signal::SIGRTMIN;
///
/// // This VMM keeps SIGRTMIN for itself.
/// set_kick_signal(SIGRTMIN() + 3)?;
/// assert_eq!(kick_signal(), SIGRTMIN() + 3);
/// assert!(matches!(set_kick_signal(libc::SIGUSR1), Err(Error::NotRealTimeSignal { .. })));
/// # Ok::<(), Error>(())
/// ```
pub fn set_kick_signal(signal: c_int) -> Result<()> {
    check_real_time(signal)?;
    let mut kick = lock(&KICK_SIGNAL);
    if kick.installed && kick.signal() != signal {
        return Err(Error::KickSignalInUse {
            current: kick.signal(),
        });
    }
    kick.chosen = Some(signal);
    Ok(())
}

/// Checks that `signal` is a real-time signal.
fn check_real_time(signal: c_int) -> Result<()> {
    let (min, max) = (SIGRTMIN(), SIGRTMAX());
    if (min..=max).contains(&signal) {
        Ok(())
    } else {
        Err(Error::NotRealTimeSignal { signal, min, max })
    }
}

/// Does nothing: the signal's only purpose is to interrupt `KVM_RUN`.
extern "C" fn handle_kick_signal(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// Installs the handler of the kick signal, once per process, and fixes the signal.
fn register_kick_handler() -> Result<()> {
    let mut kick = lock(&KICK_SIGNAL);
    if !kick.installed {
        let signal = kick.signal();
        register_signal_handler(signal, handle_kick_signal)
            .map_err(|source| Error::RegisterSignalHandler { signal, source })?;
        kick.installed = true;
    }
    Ok(())
}

/// Controls a running vCPU thread. Dropping the handle stops the thread and waits for it.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    control: Arc<Control>,
    /// `None` only once joined.
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// The index of the vCPU.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// What the vCPU thread is doing.
    pub fn state(&self) -> RunState {
        self.control.lock().state
    }

    /// Makes the vCPU leave the guest once; it goes back in unless paused or stopped.
    ///
    /// This and the other methods that act on the thread are for other threads: called from
    /// the vCPU's own thread (a device on its bus), [`pause`](Self::pause) and
    /// [`stop`](Self::stop) would wait for themselves.
    pub fn kick(&self) {
        let shared = self.control.lock();
        self.kick_locked(&shared);
    }

    /// Takes the vCPU out of the guest and waits until its thread is paused, or has exited.
    ///
    /// Pausing, the thread tells a guest with kvmclock that it is paused
    /// (`KVM_KVMCLOCK_CTRL`), so that the guest's soft-lockup watchdog does not take the pause
    /// for a hang when it resumes.
    pub fn pause(&self) {
        let mut shared = self.control.lock();
        if shared.request == Request::Run {
            shared.request = Request::Pause;
        }
        self.kick_locked(&shared);
        let _paused = self
            .control
            .changed
            .wait_while(shared, |s| {
                s.request == Request::Pause && s.state == RunState::Running
            })
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Saves the state of the paused vCPU: its thread, which owns the vCPU, reads the state and
    /// hands it over. A pause on its way is waited for.
    ///
    /// For a state the guest can go on from, pause every vCPU of the VM before saving any.
    ///
    /// # Errors
    ///
    /// [`Error::NotPaused`] at once when the vCPU runs or its thread has exited;
    /// [`Error::SaveState`] when the save failed.
    pub fn save_state(&self) -> Result<VcpuState> {
        let changed = &self.control.changed;
        let paused = |s: &Shared| s.request == Request::Pause && s.state == RunState::Paused;
        let shared = self.control.lock();
        // A pause on its way, or another save in progress: wait for it.
        let mut shared = changed
            .wait_while(shared, |s| {
                (s.request == Request::Pause && s.state == RunState::Running)
                    || (paused(s) && !matches!(s.save, SaveSlot::Idle))
            })
            .unwrap_or_else(PoisonError::into_inner);
        if !paused(&shared) {
            return Err(Error::NotPaused {
                index: self.index,
                state: shared.state,
            });
        }
        shared.save = SaveSlot::Requested;
        changed.notify_all();
        let mut shared = changed
            .wait_while(shared, |s| {
                paused(s) && matches!(s.save, SaveSlot::Requested)
            })
            .unwrap_or_else(PoisonError::into_inner);
        let slot = std::mem::take(&mut shared.save);
        changed.notify_all();
        match slot {
            SaveSlot::Done(result) => (*result).map_err(|source| Error::SaveState {
                index: self.index,
                source,
            }),
            // Resumed, stopped or exited before the thread saw the request.
            SaveSlot::Idle | SaveSlot::Requested => Err(Error::NotPaused {
                index: self.index,
                state: shared.state,
            }),
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut shared = self.control.lock();
        if shared.request == Request::Pause {
            shared.request = Request::Run;
            self.control.changed.notify_all();
        }
    }

    /// Stops the vCPU, kicking it out of the guest, and waits for its thread to end.
    ///
    /// # Errors
    ///
    /// [`Error::ThreadPanicked`] when the thread panicked.
    pub fn stop(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut shared = self.control.lock();
            shared.request = Request::Stop;
            self.control.changed.notify_all();
            kick(&shared, &thread, self.index);
        }
        thread.join().map_err(|_| Error::ThreadPanicked(self.index))
    }

    fn kick_locked(&self, shared: &Shared) {
        if let Some(thread) = &self.thread {
            kick(shared, thread, self.index);
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Err(err) = self.stop_and_join() {
            log::error!("{err}");
        }
    }
}

/// Makes the vCPU of `thread` leave `KVM_RUN`, if the thread holds it. `shared` must be the
/// locked state of that thread.
fn kick(shared: &Shared, thread: &JoinHandle<()>, index: u8) {
    let Some(immediate_exit) = shared.immediate_exit else {
        return;
    };
    // SAFETY: `immediate_exit` is `Some` only while the vCPU thread owns the vCPU; the thread
    // clears it, under the lock the caller holds, before it drops the vCPU.
    unsafe { immediate_exit.store(1) };
    // The thread has not been joined (the handle still holds it), so its pthread id is valid.
    if let Err(err) = thread.kill(kick_signal()) {
        log::error!("Cannot signal the thread of vCPU {index}: {err}");
    }
}

impl Vcpu {
    /// Runs the vCPU on a new thread named `ember_vcpu{index}` until the handle stops it or
    /// the vCPU ends the VM, in which case it tells `notifier` why (see [`VcpuEvent::vm_exit`];
    /// errors are prefixed with the vCPU index) and its thread ends. The VM's other vCPUs go on
    /// until the VMM stops them.
    ///
    /// # Errors
    ///
    /// [`Error::RegisterSignalHandler`] when the handler of the [`kick_signal`] cannot be
    /// installed, [`Error::SpawnThread`] when the thread cannot be created.
    pub fn start(self, notifier: VmExitNotifier) -> Result<VcpuHandle> {
        self.start_with_hook(notifier, None)
    }

    /// As [`start`](Self::start), but the new thread first runs `hook`, before it runs the
    /// guest. When the hook fails, the thread ends at once and tells `notifier`
    /// (`vCPU {index}: The thread-start hook failed: {error}`).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_hook(
        self,
        notifier: VmExitNotifier,
        hook: Option<ThreadHook>,
    ) -> Result<VcpuHandle> {
        self.start_with(
            notifier,
            StartOptions {
                hook,
                paused: false,
            },
        )
    }

    /// As [`start`](Self::start), with the hook and the initial pause of `options`. A vCPU
    /// started paused is [`RunState::Paused`] from the start: its state can be saved, and it
    /// runs the guest once [`VcpuHandle::resume`] is called.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with(self, notifier: VmExitNotifier, options: StartOptions) -> Result<VcpuHandle> {
        register_kick_handler()?;
        let index = self.index();
        let StartOptions { hook, paused } = options;
        let (request, state) = match paused {
            true => (Request::Pause, RunState::Paused),
            false => (Request::Run, RunState::Running),
        };
        let control = Arc::new(Control {
            shared: Mutex::new(Shared {
                request,
                state,
                save: SaveSlot::Idle,
                immediate_exit: None,
            }),
            changed: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{index}"))
            .spawn({
                let control = control.clone();
                move || run_vcpu(self, hook, &control, &notifier)
            })
            .map_err(|source| Error::SpawnThread { index, source })?;
        Ok(VcpuHandle {
            index,
            control,
            thread: Some(thread),
        })
    }
}

/// Lets go of a vCPU thread's `immediate_exit` byte and marks the thread exited when dropped,
/// also when unwinding from a panic, which it reports to the notifier.
struct ExitGuard<'a> {
    control: &'a Control,
    notifier: &'a VmExitNotifier,
    index: u8,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.notifier.notify(VmExit::Error(format!(
                "The thread of vCPU {} panicked",
                self.index
            )));
        }
        let mut shared = self.control.lock();
        shared.immediate_exit = None;
        shared.state = RunState::Exited;
        self.control.changed.notify_all();
    }
}

/// The body of a vCPU thread.
fn run_vcpu(
    mut vcpu: Vcpu,
    hook: Option<ThreadHook>,
    control: &Control,
    notifier: &VmExitNotifier,
) {
    let index = vcpu.index();
    control.lock().immediate_exit = Some(vcpu.immediate_exit());
    // Declared after `vcpu`, so dropped before it: the byte is released before it is unmapped.
    let _guard = ExitGuard {
        control,
        notifier,
        index,
    };
    if let Some(hook) = hook {
        if let Err(err) = hook() {
            notifier.notify(VmExit::Error(format!(
                "vCPU {index}: The thread-start hook failed: {err}"
            )));
            return;
        }
    }
    while control.wait_runnable(&mut vcpu) {
        let exit = match vcpu.run_once() {
            Ok(VcpuEvent::Shutdown) => {
                // A triple fault leaves no trace in the guest: where it stood is logged here,
                // once, as the thread ends.
                log::warn!("vCPU {index} triple-faulted: {}", vcpu.fault_report());
                VcpuEvent::Shutdown.vm_exit()
            }
            Ok(event) => event.vm_exit(),
            Err(err) => Some(VmExit::Error(error_chain(&err))),
        };
        if let Some(exit) = exit {
            log::debug!("vCPU {index} ends the VM: {exit}");
            let exit = match exit {
                VmExit::Error(message) => VmExit::Error(format!("vCPU {index}: {message}")),
                other => other,
            };
            notifier.notify(exit);
            break;
        }
    }
}

/// `err` and its sources, joined by colons.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifier_keeps_the_first_reason_and_signals_once() {
        let notifier = VmExitNotifier::new().unwrap();
        assert_eq!(notifier.exit(), None);
        assert!(notifier.event_fd().read().is_err(), "nothing signalled yet");
        assert_eq!(notifier.wait_timeout(Duration::from_millis(1)), None);

        let clone = notifier.clone();
        assert!(clone.notify(VmExit::Reset));
        assert!(!notifier.notify(VmExit::Shutdown));
        assert_eq!(notifier.exit(), Some(VmExit::Reset));
        assert_eq!(notifier.wait(), VmExit::Reset);
        assert_eq!(notifier.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn waiting_on_the_notifier_returns_when_another_thread_notifies() {
        let notifier = VmExitNotifier::new().unwrap();
        let waiter = std::thread::spawn({
            let notifier = notifier.clone();
            move || notifier.wait()
        });
        notifier.notify(VmExit::Error("vCPU 1: boom".to_string()));
        assert_eq!(
            waiter.join().unwrap(),
            VmExit::Error("vCPU 1: boom".to_string())
        );
    }

    #[test]
    fn events_map_to_vm_exits() {
        assert_eq!(VcpuEvent::Shutdown.vm_exit(), Some(VmExit::Reset));
        assert_eq!(VcpuEvent::Hlt.vm_exit(), Some(VmExit::Shutdown));
        assert_eq!(
            VcpuEvent::SystemEvent(SystemEvent::Shutdown).vm_exit(),
            Some(VmExit::Shutdown)
        );
        assert_eq!(
            VcpuEvent::SystemEvent(SystemEvent::Reset).vm_exit(),
            Some(VmExit::Reset)
        );
        assert_eq!(
            VcpuEvent::InternalError {
                suberror: 1,
                rip: Some(0x1000)
            }
            .vm_exit(),
            Some(VmExit::Error(
                "KVM could not emulate the instruction at guest RIP 0x1000 (emulation failure)"
                    .to_string()
            ))
        );
        for running in [
            VcpuEvent::Interrupted,
            VcpuEvent::IoIn { port: 0x60, len: 1 },
            VcpuEvent::MmioWrite {
                addr: 0xd000_0000,
                len: 4,
            },
        ] {
            assert_eq!(running.vm_exit(), None, "{running:?}");
        }
    }

    #[test]
    fn error_chain_includes_sources() {
        let err = crate::vcpu::Error::Run {
            rip: Some(0xfff0),
            source: kvm_ioctls::Error::new(libc::EFAULT),
        };
        let message = error_chain(&err);
        let cause = kvm_ioctls::Error::new(libc::EFAULT).to_string();
        assert_eq!(
            message,
            format!("Cannot run the vCPU at guest RIP 0xfff0: {cause}")
        );
    }

    #[test]
    fn only_real_time_signals_can_kick() {
        for signal in [
            libc::SIGUSR1,
            libc::SIGTERM,
            0,
            -1,
            SIGRTMAX() + 1,
            SIGRTMIN() - 1,
        ] {
            assert!(
                matches!(
                    set_kick_signal(signal),
                    Err(Error::NotRealTimeSignal { signal: s, .. }) if s == signal
                ),
                "{signal}"
            );
        }
        check_real_time(SIGRTMIN()).unwrap();
        check_real_time(SIGRTMAX()).unwrap();
        let message = set_kick_signal(libc::SIGUSR1).unwrap_err().to_string();
        assert!(message.starts_with("The vCPU kick signal must be a real-time signal"));
    }
}
