//! Where an active device's event handler runs, and the thread that serves it by default.
//!
//! A device's work is an [`EventHandler`]: it registers its file descriptors (queue
//! notification eventfds, backend sockets or TAPs, rate limiter timers) with [`EventOps`] and
//! handles their events, and may change what it waits for at any event: a network device stops
//! watching its TAP while the guest has no receive buffers, so that a waiting frame does not
//! make the loop spin.
//!
//! The [`Executor`] a device is activated with says which loop runs the handler, and [`Runner`]
//! is the running handler, whichever it is:
//!
//! - [`Executor::Thread`] (the default): a [`Worker`], an epoll thread of the device's own.
//! - `Executor::EventManager` (feature `event-manager`): the VMM's own rust-vmm
//!   `event_manager::EventManager`, of which the handler becomes a subscriber
//!   (`worker::manager`). The VMM owns the thread and the loop.
//!
//! Between two events, the handler also runs what other threads ask of it, in either place:
//!
//! - [`Runner::call`] runs a closure on the handler's thread with the handler, and returns its
//!   result: how a VMM changes a running device (a new rate limit, a new backing file) without
//!   sharing the handler's state under a lock.
//! - [`Runner::post`] does the same without waiting: the caller collects the result later from
//!   the [`Reply`], so that it can release a lock (the device's transport, which vCPUs take)
//!   before it waits on the handler.
//! - [`Runner::stop`] stops serving the handler and gives it back.
//!
//! A worker thread also answers to a [`WorkerGate`], which pauses every worker spawned with it,
//! at a point between two events, and resumes them. While paused, a worker handles no event
//! (they wait in the kernel: eventfds count, sockets buffer) but still runs calls. A VMM that
//! runs the handlers in its own loop pauses them by not running it.
//!
//! A worker thread that ends on its own (its epoll instance failed, or its handler panicked)
//! leaves the gate as it ends, so that pausing never waits for it; calls to it then fail
//! instead of waiting.
//!
//! A gate may also carry a [`WorkerHook`], which every worker spawned with it runs first on its
//! new thread, with the thread's name, before it handles anything: how a VMM installs a seccomp
//! filter on its device threads, or pins them to host CPUs.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

#[cfg(feature = "event-manager")]
pub mod manager;

/// The token the worker keeps for its own control eventfd (stop, calls, pause); handlers use
/// any other.
pub const CONTROL_TOKEN: u64 = u64::MAX;

/// A device's event handling, run by a [`Worker`].
pub trait EventHandler: Send + 'static {
    /// Registers the descriptors the handler starts out waiting on.
    ///
    /// # Errors
    ///
    /// When a descriptor cannot be registered; the worker does not start.
    fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()>;

    /// Handles `events` on the descriptor registered with `token`.
    fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, events: EventSet);
}

/// Changes to the set of descriptors a handler waits on, in the loop that runs it: its
/// [`Worker`]'s epoll set, or the VMM's `event_manager::EventManager` (feature
/// `event-manager`).
pub struct EventOps<'a> {
    inner: Ops<'a>,
}

enum Ops<'a> {
    Epoll(&'a Epoll),
    #[cfg(feature = "event-manager")]
    Manager(&'a mut (dyn manager::Registry + 'a)),
}

impl std::fmt::Debug for EventOps<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loop_kind = match self.inner {
            Ops::Epoll(_) => "worker",
            #[cfg(feature = "event-manager")]
            Ops::Manager(_) => "event-manager",
        };
        f.debug_struct("EventOps")
            .field("loop", &loop_kind)
            .finish()
    }
}

impl<'a> EventOps<'a> {
    fn epoll(epoll: &'a Epoll) -> Self {
        EventOps {
            inner: Ops::Epoll(epoll),
        }
    }

    /// Waits for `events` on `fd`, reported with `token`.
    ///
    /// # Errors
    ///
    /// When the loop refuses the descriptor; under an event manager, also when `token` does
    /// not fit its 32 bits of data.
    pub fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        match &mut self.inner {
            Ops::Epoll(epoll) => ctl(epoll, ControlOperation::Add, fd, events, token),
            #[cfg(feature = "event-manager")]
            Ops::Manager(registry) => registry.add(fd, events, token),
        }
    }

    /// Changes the events waited for on `fd`, already added.
    ///
    /// # Errors
    ///
    /// When the loop refuses the change.
    pub fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        match &mut self.inner {
            Ops::Epoll(epoll) => ctl(epoll, ControlOperation::Modify, fd, events, token),
            #[cfg(feature = "event-manager")]
            Ops::Manager(registry) => registry.modify(fd, events, token),
        }
    }

    /// Stops waiting on `fd`.
    ///
    /// # Errors
    ///
    /// When `fd` was not added.
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        match &mut self.inner {
            Ops::Epoll(epoll) => ctl(epoll, ControlOperation::Delete, fd, EventSet::empty(), 0),
            #[cfg(feature = "event-manager")]
            Ops::Manager(registry) => registry.remove(fd),
        }
    }
}

fn ctl(
    epoll: &Epoll,
    op: ControlOperation,
    fd: RawFd,
    events: EventSet,
    token: u64,
) -> io::Result<()> {
    epoll.ctl(op, fd, EpollEvent::new(events, token))
}

/// Code every worker thread runs first, given the thread's name (`ember-net`,
/// `ember-blk-{id}`, ...), before it handles any event. An error stops the thread and makes
/// [`Worker::spawn`] fail.
pub type WorkerHook = Arc<dyn Fn(&str) -> io::Result<()> + Send + Sync>;

/// A closure [`Worker::call`] runs on the worker thread.
type Call<H> = Box<dyn FnOnce(&mut H, &mut EventOps<'_>) + Send>;

/// What other threads ask of a worker thread, in order.
enum Message<H> {
    Call(Call<H>),
    Stop,
}

/// A thread running an [`EventHandler`] until [`Worker::stop`].
pub struct Worker<H> {
    control: Arc<EventFd>,
    messages: mpsc::Sender<Message<H>>,
    gate: WorkerGate,
    thread: JoinHandle<Option<H>>,
}

impl<H> std::fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("thread", &self.thread.thread().name())
            .finish_non_exhaustive()
    }
}

/// Why a [`Worker`] did not start, with the handler it was given, so that the device keeps its
/// backend.
pub struct SpawnError<H> {
    /// What failed.
    pub error: io::Error,
    /// The handler, untouched by any thread.
    pub handler: H,
}

impl<H> std::fmt::Debug for SpawnError<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<H: EventHandler> Worker<H> {
    /// Registers the handler's descriptors and starts the thread, named `name`, paused and
    /// resumed with `gate`. The thread first runs the gate's [`WorkerHook`], if any, and this
    /// waits for it.
    ///
    /// # Errors
    ///
    /// When the epoll instance or the control eventfd cannot be created, the handler's
    /// [`EventHandler::init`] fails, the thread cannot be spawned or its hook fails; the handler
    /// comes back in the [`SpawnError`].
    pub fn spawn(name: String, mut handler: H, gate: &WorkerGate) -> Result<Self, SpawnError<H>> {
        let setup = |handler: &mut H| -> io::Result<(Epoll, Epoll, Arc<EventFd>)> {
            let epoll = Epoll::new()?;
            let paused = Epoll::new()?;
            let control = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
            EventOps::epoll(&paused).add(control.as_raw_fd(), EventSet::IN, CONTROL_TOKEN)?;
            let mut ops = EventOps::epoll(&epoll);
            ops.add(control.as_raw_fd(), EventSet::IN, CONTROL_TOKEN)?;
            handler.init(&mut ops)?;
            Ok((epoll, paused, control))
        };
        let (epoll, paused, control) = match setup(&mut handler) {
            Ok(ready) => ready,
            Err(error) => return Err(SpawnError { error, handler }),
        };
        // The handler goes to the thread only once it runs: a thread that cannot be spawned
        // would drop whatever it had been given.
        let (give, take) = mpsc::sync_channel::<H>(1);
        let (messages, inbox) = mpsc::channel();
        let thread_gate = gate.clone();
        let thread_control = control.clone();
        let hook = gate.thread_hook();
        let (started, hook_result) = mpsc::sync_channel::<io::Result<()>>(1);
        let thread_name = name.clone();
        // Registered before the thread runs, so that a thread that ends at once still leaves
        // the gate after it joined.
        gate.register(&control);
        let spawned = thread::Builder::new().name(name).spawn(move || {
            // However the thread ends, returning or unwinding, it leaves the gate.
            let _leave = LeaveGate {
                gate: thread_gate.clone(),
                control: thread_control.clone(),
            };
            let result = hook.map_or(Ok(()), |hook| hook(&thread_name));
            let hook_failed = result.is_err();
            // `spawn` waits for this; it is gone only if `spawn` itself is.
            let _ = started.send(result);
            if hook_failed {
                return None;
            }
            // The sender is dropped without sending only when `spawn` failed, and then this
            // thread does not run.
            let handler = take.recv().ok()?;
            let mut thread = WorkerThread {
                epoll,
                paused,
                control: thread_control,
                inbox,
                gate: thread_gate,
                handler,
            };
            thread.run();
            Some(thread.handler)
        });
        let spawned = spawned.and_then(|thread| {
            let hook = hook_result
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("the device worker thread panicked")));
            match hook {
                Ok(()) => Ok(thread),
                Err(err) => {
                    // The thread ends without the handler.
                    let _ = thread.join();
                    Err(io::Error::new(
                        err.kind(),
                        format!("the device worker's thread-start hook failed: {err}"),
                    ))
                }
            }
        });
        match spawned {
            Ok(thread) => match give.send(handler) {
                Ok(()) => Ok(Worker {
                    control,
                    messages,
                    gate: gate.clone(),
                    thread,
                }),
                // Cannot happen: the thread holds the receiver until it has the handler.
                Err(mpsc::SendError(handler)) => Err(SpawnError {
                    error: io::Error::other("the device worker thread ended before it started"),
                    handler,
                }),
            },
            Err(error) => {
                gate.unregister(&control);
                Err(SpawnError { error, handler })
            }
        }
    }

    /// Runs `f` on the worker thread, between two events (or while the worker is paused), and
    /// returns what it returns.
    ///
    /// Must not be called from the worker thread itself, which would wait for itself.
    ///
    /// # Errors
    ///
    /// When the control eventfd cannot be written, or the thread is gone (it panicked).
    pub fn call<R, F>(&self, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut H, &mut EventOps<'_>) -> R + Send + 'static,
    {
        self.post(f)?.wait()
    }

    /// Sends `f` to run on the worker thread as [`Worker::call`] does, without waiting for it:
    /// [`Reply::wait`] gives its result. `f` runs whether or not the reply is waited for.
    ///
    /// It never blocks, so that it can be called under a lock that other threads need, and
    /// the lock released before waiting.
    ///
    /// # Errors
    ///
    /// When the control eventfd cannot be written, or the thread is gone.
    pub fn post<R, F>(&self, f: F) -> io::Result<Reply<R>>
    where
        R: Send + 'static,
        F: FnOnce(&mut H, &mut EventOps<'_>) -> R + Send + 'static,
    {
        let (reply, result) = mpsc::sync_channel(1);
        let call: Call<H> = Box::new(move |handler, ops| {
            // The caller waits for this reply; it is gone only if it stopped waiting.
            let _ = reply.send(f(handler, ops));
        });
        self.send(Message::Call(call))?;
        Ok(Reply(result))
    }

    /// Stops the thread after the event it is handling, and returns the handler. A thread that
    /// already ended on its own gives its handler back too, unless it panicked.
    ///
    /// # Errors
    ///
    /// When the control eventfd cannot be written or the thread panicked.
    pub fn stop(self) -> io::Result<H> {
        self.gate.unregister(&self.control);
        // Where the thread dropped its inbox it has ended, and the join below does not wait.
        if self.messages.send(Message::Stop).is_ok() {
            self.control.write(1)?;
        }
        self.thread
            .join()
            .ok()
            .flatten()
            .ok_or_else(|| io::Error::other("the device worker thread panicked"))
    }

    /// Whether the thread ended on its own: its epoll instance failed or its handler panicked.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn send(&self, message: Message<H>) -> io::Result<()> {
        self.messages.send(message).map_err(|_| gone())?;
        self.control.write(1)
    }
}

/// The result of a closure [`Worker::post`] sent to a worker thread.
#[derive(Debug)]
#[must_use = "the reply says whether the closure ran"]
pub struct Reply<R>(pub(crate) mpsc::Receiver<R>);

impl<R> Reply<R> {
    /// Waits for the closure to have run on the worker thread, and returns what it returned.
    ///
    /// # Errors
    ///
    /// When the thread ended before it ran the closure (it panicked, or it was stopped first).
    pub fn wait(self) -> io::Result<R> {
        self.0.recv().map_err(|_| gone())
    }
}

/// Where an active device's handler runs: what [`ActivateParams`](crate::ActivateParams) tells
/// a device, and what [`Runner::start`] starts its handler with.
#[non_exhaustive]
#[derive(Clone)]
pub enum Executor {
    /// A [`Worker`] thread of the device's own, paused and resumed with this gate: the default.
    Thread(WorkerGate),
    /// The VMM's own `event_manager::EventManager`, reached through its remote endpoint: the
    /// handler becomes one of its subscribers, served by whichever thread runs the manager's
    /// loop (feature `event-manager`). That loop must be running, on another thread than the
    /// one that activates, changes or resets the device, for as long as the device is active.
    #[cfg(feature = "event-manager")]
    EventManager(event_manager::RemoteEndpoint<manager::Subscriber>),
}

impl Default for Executor {
    /// A worker thread behind a gate of its own.
    fn default() -> Self {
        Executor::Thread(WorkerGate::new())
    }
}

impl From<WorkerGate> for Executor {
    fn from(gate: WorkerGate) -> Self {
        Executor::Thread(gate)
    }
}

#[cfg(feature = "event-manager")]
impl From<event_manager::RemoteEndpoint<manager::Subscriber>> for Executor {
    fn from(endpoint: event_manager::RemoteEndpoint<manager::Subscriber>) -> Self {
        Executor::EventManager(endpoint)
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executor::Thread(gate) => f.debug_tuple("Thread").field(gate).finish(),
            #[cfg(feature = "event-manager")]
            Executor::EventManager(_) => f.write_str("EventManager"),
        }
    }
}

/// A running [`EventHandler`], wherever its [`Executor`] put it: on a [`Worker`] thread or in
/// the VMM's event manager. What other threads ask of it ([`call`](Runner::call),
/// [`post`](Runner::post), [`stop`](Runner::stop)) runs between two of its events, on the
/// thread that runs it, in either place.
pub struct Runner<H> {
    inner: Running<H>,
}

enum Running<H> {
    Thread(Worker<H>),
    #[cfg(feature = "event-manager")]
    Manager(manager::Managed<H>),
}

impl<H> std::fmt::Debug for Runner<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Running::Thread(worker) => f.debug_tuple("Runner").field(worker).finish(),
            #[cfg(feature = "event-manager")]
            Running::Manager(managed) => f.debug_tuple("Runner").field(managed).finish(),
        }
    }
}

impl<H: EventHandler> Runner<H> {
    /// Starts serving `handler` where `executor` says: spawns its worker thread, named
    /// `name`, or adds it to the VMM's event manager (which calls its
    /// [`EventHandler::init`]); the name then only appears in logs.
    ///
    /// # Errors
    ///
    /// As [`Worker::spawn`]; under an event manager, when the handler's
    /// [`EventHandler::init`] fails or the manager is gone. The handler comes back in the
    /// [`SpawnError`].
    pub fn start(name: String, handler: H, executor: &Executor) -> Result<Self, SpawnError<H>> {
        let inner = match executor {
            Executor::Thread(gate) => Running::Thread(Worker::spawn(name, handler, gate)?),
            #[cfg(feature = "event-manager")]
            Executor::EventManager(endpoint) => {
                Running::Manager(manager::Managed::start(name, handler, endpoint)?)
            }
        };
        Ok(Runner { inner })
    }

    /// Runs `f` with the handler between two of its events, on the thread that serves it, and
    /// returns what it returns. Must not be called from that thread, which would wait for
    /// itself.
    ///
    /// # Errors
    ///
    /// When the handler's thread or event manager is gone.
    pub fn call<R, F>(&self, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut H, &mut EventOps<'_>) -> R + Send + 'static,
    {
        self.post(f)?.wait()
    }

    /// Sends `f` to run as [`Runner::call`] does, without waiting for it: [`Reply::wait`]
    /// gives its result. It never blocks.
    ///
    /// # Errors
    ///
    /// When the handler's thread or event manager is gone.
    pub fn post<R, F>(&self, f: F) -> io::Result<Reply<R>>
    where
        R: Send + 'static,
        F: FnOnce(&mut H, &mut EventOps<'_>) -> R + Send + 'static,
    {
        match &self.inner {
            Running::Thread(worker) => worker.post(f),
            #[cfg(feature = "event-manager")]
            Running::Manager(managed) => managed.post(f),
        }
    }

    /// Stops serving the handler after the event it is handling, and returns it: the worker
    /// thread ends, or the event manager drops the subscriber and its descriptors.
    ///
    /// # Errors
    ///
    /// As [`Worker::stop`]; under an event manager, when the handler is lost (it panicked in
    /// the manager's loop).
    pub fn stop(self) -> io::Result<H> {
        match self.inner {
            Running::Thread(worker) => worker.stop(),
            #[cfg(feature = "event-manager")]
            Running::Manager(managed) => managed.stop(),
        }
    }
}

pub(crate) fn gone() -> io::Error {
    io::Error::other("the device worker thread is gone")
}

/// Takes a worker thread out of its gate when the thread ends, however it ends.
struct LeaveGate {
    gate: WorkerGate,
    control: Arc<EventFd>,
}

impl Drop for LeaveGate {
    fn drop(&mut self) {
        self.gate.unregister(&self.control);
    }
}

/// What the worker thread owns.
struct WorkerThread<H> {
    epoll: Epoll,
    control: Arc<EventFd>,
    /// An epoll set with only the control eventfd, waited on while paused.
    paused: Epoll,
    inbox: mpsc::Receiver<Message<H>>,
    gate: WorkerGate,
    handler: H,
}

impl<H: EventHandler> WorkerThread<H> {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::error!("A device worker stopped: epoll_wait failed: {err}");
                    return;
                }
            };
            for event in events.iter().take(count) {
                if event.data() == CONTROL_TOKEN {
                    if !self.control_event() {
                        return;
                    }
                    continue;
                }
                let mut ops = EventOps::epoll(&self.epoll);
                self.handler
                    .handle_event(&mut ops, event.data(), event.event_set());
            }
        }
    }

    /// Runs the calls that arrived, and stays paused while the gate is closed. Returns `false`
    /// when the thread is to stop.
    fn control_event(&mut self) -> bool {
        if !self.serve_messages() {
            return false;
        }
        if !self.gate.park_if_paused(&self.control) {
            return true;
        }
        // Paused: only the control eventfd is watched, through an epoll set of its own, until
        // the gate opens.
        let mut events = [EpollEvent::default()];
        loop {
            match self.paused.wait(-1, &mut events) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::error!("A paused device worker resumes: epoll_wait failed: {err}");
                    self.gate.unpark(&self.control);
                    return true;
                }
            }
            if !self.serve_messages() {
                self.gate.unpark(&self.control);
                return false;
            }
            if self.gate.unpark_if_open(&self.control) {
                return true;
            }
        }
    }

    /// Clears the control eventfd and runs every message waiting; `false` on a stop.
    fn serve_messages(&mut self) -> bool {
        // A non-blocking eventfd already cleared reads EAGAIN: nothing is lost, the messages
        // are in the channel.
        let _ = self.control.read();
        while let Ok(message) = self.inbox.try_recv() {
            match message {
                Message::Call(call) => {
                    let mut ops = EventOps::epoll(&self.epoll);
                    call(&mut self.handler, &mut ops);
                }
                Message::Stop => return false,
            }
        }
        true
    }
}

/// Pauses and resumes, together, every [`Worker`] spawned with it (clones share one gate).
///
/// [`pause`](WorkerGate::pause) returns once every worker has finished the event it was
/// handling and waits; [`resume`](WorkerGate::resume) lets them go on. A VMM that pauses a VM
/// stops its vCPUs first, so that no driver notification can activate a device meanwhile, then
/// closes the gate.
#[derive(Debug, Clone, Default)]
pub struct WorkerGate {
    inner: Arc<GateInner>,
}

#[derive(Default)]
struct GateInner {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Run first by every worker thread.
    hook: Mutex<Option<WorkerHook>>,
}

impl std::fmt::Debug for GateInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateInner")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    /// The running workers.
    workers: Vec<Registered>,
}

/// A running worker, as its gate knows it.
#[derive(Debug)]
struct Registered {
    /// Its control eventfd, which also tells it apart.
    control: Arc<EventFd>,
    /// Whether it waits for the gate to open.
    parked: bool,
}

impl GateState {
    fn find(&mut self, control: &Arc<EventFd>) -> Option<&mut Registered> {
        self.workers
            .iter_mut()
            .find(|w| Arc::ptr_eq(&w.control, control))
    }
}

impl WorkerGate {
    /// Creates an open gate with no workers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the hook every worker spawned from now on runs first on its thread (see
    /// [`WorkerHook`]); `None` removes it. Workers already running are not affected.
    pub fn set_thread_hook(&self, hook: Option<WorkerHook>) {
        *self
            .inner
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = hook;
    }

    fn thread_hook(&self) -> Option<WorkerHook> {
        self.inner
            .hook
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Pauses every worker and waits until each one does. A worker whose thread ends meanwhile
    /// is not waited for.
    ///
    /// # Errors
    ///
    /// When a worker's control eventfd cannot be written; the workers reached are paused, and
    /// [`resume`](WorkerGate::resume) resumes them.
    pub fn pause(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.paused = true;
        for worker in &state.workers {
            worker.control.write(1)?;
        }
        let _paused = self
            .inner
            .changed
            .wait_while(state, |s| s.workers.iter().any(|w| !w.parked))
            .unwrap_or_else(PoisonError::into_inner);
        Ok(())
    }

    /// Lets every paused worker go on.
    ///
    /// # Errors
    ///
    /// When a worker's control eventfd cannot be written.
    pub fn resume(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.paused = false;
        for worker in &state.workers {
            worker.control.write(1)?;
        }
        Ok(())
    }

    /// Whether the gate is closed.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// How many workers run behind the gate.
    pub fn workers(&self) -> usize {
        self.lock().workers.len()
    }

    fn register(&self, control: &Arc<EventFd>) {
        let mut state = self.lock();
        state.workers.push(Registered {
            control: control.clone(),
            parked: false,
        });
        if state.paused {
            // A worker spawned while the gate is closed pauses at once.
            if let Err(err) = control.write(1) {
                log::error!("A device worker started while paused cannot be paused: {err}");
            }
        }
    }

    fn unregister(&self, control: &Arc<EventFd>) {
        let mut state = self.lock();
        state.workers.retain(|w| !Arc::ptr_eq(&w.control, control));
        self.inner.changed.notify_all();
    }

    /// Counts the worker of `control` as paused if the gate is closed; returns whether it is.
    fn park_if_paused(&self, control: &Arc<EventFd>) -> bool {
        let mut state = self.lock();
        if !state.paused {
            return false;
        }
        if let Some(worker) = state.find(control) {
            worker.parked = true;
        }
        self.inner.changed.notify_all();
        true
    }

    /// Counts a paused worker as running again if the gate is open; returns whether it is. The
    /// check and the count are one step, so a [`pause`](WorkerGate::pause) that follows a
    /// resume at once never counts a worker that is on its way out.
    fn unpark_if_open(&self, control: &Arc<EventFd>) -> bool {
        let mut state = self.lock();
        if state.paused {
            return false;
        }
        if let Some(worker) = state.find(control) {
            worker.parked = false;
        }
        true
    }

    fn unpark(&self, control: &Arc<EventFd>) {
        if let Some(worker) = self.lock().find(control) {
            worker.parked = false;
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts writes to an eventfd, and stops watching it after the third.
    struct Counter {
        evt: EventFd,
        seen: u64,
        done: mpsc::Sender<u64>,
    }

    impl EventHandler for Counter {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(self.evt.as_raw_fd(), EventSet::IN, 7)
        }

        fn handle_event(&mut self, ops: &mut EventOps<'_>, token: u64, events: EventSet) {
            assert_eq!(token, 7);
            assert!(events.contains(EventSet::IN));
            self.seen += self.evt.read().unwrap();
            if self.seen >= 3 {
                ops.remove(self.evt.as_raw_fd()).unwrap();
            }
            self.done.send(self.seen).unwrap();
        }
    }

    #[test]
    fn worker_runs_the_handler_until_stopped_and_returns_it() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (done, seen) = mpsc::channel();
        let handler = Counter {
            evt: evt.try_clone().unwrap(),
            seen: 0,
            done,
        };
        let worker = Worker::spawn("test-worker".into(), handler, &WorkerGate::new()).unwrap();
        for expected in 1..=3 {
            evt.write(1).unwrap();
            assert_eq!(seen.recv().unwrap(), expected);
        }
        // No longer watched: this write reaches no handler.
        evt.write(1).unwrap();
        let handler = worker.stop().unwrap();
        assert_eq!(handler.seen, 3);
        assert!(seen.try_recv().is_err());
    }

    fn counter() -> (EventFd, mpsc::Receiver<u64>, Counter) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (done, seen) = mpsc::channel();
        let handler = Counter {
            evt: evt.try_clone().unwrap(),
            seen: 0,
            done,
        };
        (evt, seen, handler)
    }

    #[test]
    fn call_runs_on_the_worker_thread_with_the_handler() {
        let (evt, seen, handler) = counter();
        let worker = Worker::spawn("test-call".into(), handler, &WorkerGate::new()).unwrap();
        evt.write(1).unwrap();
        assert_eq!(seen.recv().unwrap(), 1);
        let (count, thread) = worker
            .call(|handler, _| {
                handler.seen += 10;
                (handler.seen, thread::current().name().map(String::from))
            })
            .unwrap();
        assert_eq!(count, 11);
        assert_eq!(thread.as_deref(), Some("test-call"));
        assert_eq!(worker.stop().unwrap().seen, 11);
    }

    #[test]
    fn a_paused_worker_handles_no_event_but_runs_calls_until_resumed() {
        let gate = WorkerGate::new();
        let (evt, seen, handler) = counter();
        let worker = Worker::spawn("test-pause".into(), handler, &gate).unwrap();
        assert_eq!(gate.workers(), 1);
        gate.pause().unwrap();
        assert!(gate.is_paused());
        evt.write(1).unwrap();
        // Served while paused, and the event is still waiting.
        assert_eq!(worker.call(|handler, _| handler.seen).unwrap(), 0);
        assert!(seen.try_recv().is_err());
        gate.resume().unwrap();
        assert_eq!(seen.recv().unwrap(), 1);
        // Paused again at once after a resume: the pause waits for the worker to be back.
        gate.pause().unwrap();
        evt.write(1).unwrap();
        assert_eq!(worker.call(|handler, _| handler.seen).unwrap(), 1);
        // Stopped while paused: the handler comes back, the gate forgets the worker.
        assert_eq!(worker.stop().unwrap().seen, 1);
        assert_eq!(gate.workers(), 0);
        gate.resume().unwrap();
    }

    #[test]
    fn a_worker_spawned_behind_a_closed_gate_starts_paused() {
        let gate = WorkerGate::new();
        gate.pause().unwrap();
        let (evt, seen, handler) = counter();
        let worker = Worker::spawn("test-closed".into(), handler, &gate).unwrap();
        evt.write(1).unwrap();
        // The pause went ahead of the event: the worker counted as paused first.
        gate.pause().unwrap();
        assert_eq!(worker.call(|handler, _| handler.seen).unwrap(), 0);
        assert!(seen.try_recv().is_err());
        gate.resume().unwrap();
        assert_eq!(seen.recv().unwrap(), 1);
        worker.stop().unwrap();
    }

    #[test]
    fn pause_waits_for_every_worker() {
        let gate = WorkerGate::new();
        let mut workers = Vec::new();
        let mut evts = Vec::new();
        for i in 0..4 {
            let (evt, seen, handler) = counter();
            workers.push((
                Worker::spawn(format!("test-{i}"), handler, &gate).unwrap(),
                seen,
            ));
            evts.push(evt);
        }
        gate.pause().unwrap();
        for evt in &evts {
            evt.write(1).unwrap();
        }
        for (worker, seen) in &workers {
            assert_eq!(worker.call(|handler, _| handler.seen).unwrap(), 0);
            assert!(seen.try_recv().is_err());
        }
        gate.resume().unwrap();
        for (worker, seen) in workers {
            assert_eq!(seen.recv().unwrap(), 1);
            worker.stop().unwrap();
        }
    }

    /// A handler whose descriptor epoll refuses; it carries a value to recognise it by.
    struct FailingInit(u32);

    impl EventHandler for FailingInit {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(-1, EventSet::IN, 0)
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
    }

    /// A handler that panics at its first event, as a bug would make it.
    struct Panicking(EventFd);

    impl EventHandler for Panicking {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(self.0.as_raw_fd(), EventSet::IN, 3)
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {
            panic!("the handler failed");
        }
    }

    #[test]
    fn a_worker_whose_thread_ended_does_not_hold_up_pause_resume_or_calls() {
        let gate = WorkerGate::new();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let worker = Worker::spawn(
            "test-panics".into(),
            Panicking(evt.try_clone().unwrap()),
            &gate,
        )
        .unwrap();
        // A healthy worker behind the same gate.
        let (_, _, handler) = counter();
        let healthy = Worker::spawn("test-healthy".into(), handler, &gate).unwrap();
        assert_eq!(gate.workers(), 2);
        evt.write(1).unwrap();
        // Until the thread is gone, calls may or may not be served; afterwards they fail.
        while !worker.is_finished() {
            thread::yield_now();
        }
        assert_eq!(gate.workers(), 1);
        gate.pause().unwrap();
        assert!(worker.call(|_, _| ()).is_err());
        assert_eq!(healthy.call(|handler, _| handler.seen).unwrap(), 0);
        gate.resume().unwrap();
        gate.pause().unwrap();
        gate.resume().unwrap();
        assert!(worker.stop().is_err(), "the thread panicked");
        healthy.stop().unwrap();
        assert_eq!(gate.workers(), 0);
    }

    #[test]
    fn a_worker_that_ends_while_paused_leaves_the_gate() {
        let gate = WorkerGate::new();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let worker = Worker::spawn(
            "test-paused-end".into(),
            Panicking(evt.try_clone().unwrap()),
            &gate,
        )
        .unwrap();
        gate.pause().unwrap();
        // A call that panics on the paused thread ends it while it counts as parked.
        let reply = worker.post(|_, _| panic!("the call failed")).unwrap();
        assert!(reply.wait().is_err());
        while !worker.is_finished() {
            thread::yield_now();
        }
        assert_eq!(gate.workers(), 0);
        gate.resume().unwrap();
        gate.pause().unwrap();
        gate.resume().unwrap();
        assert!(worker.stop().is_err());
    }

    #[test]
    fn post_runs_the_closure_without_waiting_and_the_reply_gives_its_result() {
        let gate = WorkerGate::new();
        let (_, _, handler) = counter();
        let worker = Worker::spawn("test-post".into(), handler, &gate).unwrap();
        gate.pause().unwrap();
        let reply = worker
            .post(|handler, _| {
                handler.seen = 41;
                handler.seen + 1
            })
            .unwrap();
        assert_eq!(reply.wait().unwrap(), 42);
        // Not waited for: it still runs, in order.
        let _ = worker.post(|handler, _| handler.seen += 1).unwrap();
        assert_eq!(worker.call(|handler, _| handler.seen).unwrap(), 42);
        gate.resume().unwrap();
        assert_eq!(worker.stop().unwrap().seen, 42);
    }

    #[test]
    fn a_handler_whose_init_fails_is_not_started_and_comes_back() {
        let err =
            Worker::spawn("test-worker".into(), FailingInit(7), &WorkerGate::new()).unwrap_err();
        assert_eq!(err.error.raw_os_error(), Some(libc::EBADF));
        assert_eq!(err.handler.0, 7);
    }

    /// A handler that waits on nothing but the worker's own control eventfd.
    struct Idle(u32);

    impl EventHandler for Idle {
        fn init(&mut self, _: &mut EventOps<'_>) -> io::Result<()> {
            Ok(())
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
    }

    #[test]
    fn the_gate_hook_runs_first_on_each_worker_thread_with_its_name() {
        let gate = WorkerGate::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        gate.set_thread_hook(Some(Arc::new({
            let seen = seen.clone();
            move |name: &str| {
                let thread = thread::current().name().map(str::to_string);
                seen.lock().unwrap().push((name.to_string(), thread));
                Ok(())
            }
        })));
        let worker = Worker::spawn("ember-net".into(), Idle(1), &gate).unwrap();
        // `spawn` waited for the hook.
        assert_eq!(
            *seen.lock().unwrap(),
            [("ember-net".to_string(), Some("ember-net".to_string()))]
        );
        assert_eq!(worker.stop().unwrap().0, 1);
    }

    #[test]
    fn a_failing_gate_hook_stops_the_worker_and_gives_the_handler_back() {
        let gate = WorkerGate::new();
        gate.set_thread_hook(Some(Arc::new(|_: &str| Err(io::Error::other("no filter")))));
        let err = Worker::spawn("ember-blk-rootfs".into(), Idle(9), &gate).unwrap_err();
        assert_eq!(err.handler.0, 9);
        assert!(err.error.to_string().contains("no filter"), "{}", err.error);
        assert_eq!(gate.workers(), 0);
        gate.set_thread_hook(None);
        let worker = Worker::spawn("ember-blk-rootfs".into(), Idle(9), &gate).unwrap();
        worker.stop().unwrap();
    }

    #[test]
    fn a_runner_on_a_thread_executor_is_a_worker_behind_its_gate() {
        let gate = WorkerGate::new();
        let (evt, seen, handler) = counter();
        let runner = Runner::start("test-runner".into(), handler, &gate.clone().into()).unwrap();
        assert_eq!(gate.workers(), 1);
        evt.write(1).unwrap();
        assert_eq!(seen.recv().unwrap(), 1);
        gate.pause().unwrap();
        let thread = runner
            .call(|_, _| thread::current().name().map(String::from))
            .unwrap();
        assert_eq!(thread.as_deref(), Some("test-runner"));
        gate.resume().unwrap();
        assert_eq!(runner.stop().unwrap().seen, 1);
        assert_eq!(gate.workers(), 0);
    }

    #[test]
    fn the_default_executor_is_a_thread_behind_a_gate_of_its_own() {
        assert!(matches!(Executor::default(), Executor::Thread(gate) if gate.workers() == 0));
    }
}
