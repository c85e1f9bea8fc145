//! A device's handler served by the VMM's own rust-vmm `event_manager::EventManager` (feature
//! `event-manager`) instead of a [`Worker`](super::Worker) thread.
//!
//! The handler becomes a subscriber of the manager: the manager's loop calls its
//! [`EventHandler::handle_event`] for the descriptors it registered, through [`EventOps`] that
//! change the manager's own epoll set. Everything else goes through the manager's
//! `RemoteEndpoint`, so that it runs on the loop's thread between two events: the handler is
//! added (and initialised) when the device is activated, calls and changes are run there, and
//! the subscriber is removed, with its descriptors, when the device is reset.
//!
//! The manager's subscribers are [`Subscriber`]s, the usual type-erased
//! `Arc<Mutex<dyn MutEventSubscriber + Send>>`, so that one manager serves devices of any type
//! and the VMM's own subscribers.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};

use event_manager::{Events, MutEventSubscriber, RemoteEndpoint, SubscriberId};
use vmm_sys_util::epoll::EventSet;

use super::{EventHandler, EventOps, Ops, Reply, SpawnError, gone};

/// What an `EventManager` that serves devices holds: any subscriber, behind a lock that its
/// loop and the threads that change a device share.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event manager's changes to its epoll set, as [`EventOps`] makes them.
pub(super) trait Registry {
    fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
}

impl Registry for event_manager::EventOps<'_> {
    fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        let data = data(token)?;
        valid(fd)?;
        event_manager::EventOps::add(self, Events::with_data_raw(fd, data, events))
            .map_err(io_error)
    }

    fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        let data = data(token)?;
        valid(fd)?;
        event_manager::EventOps::modify(self, Events::with_data_raw(fd, data, events))
            .map_err(io_error)
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        valid(fd)?;
        event_manager::EventOps::remove(self, Events::empty_raw(fd)).map_err(io_error)
    }
}

impl<'a> EventOps<'a> {
    fn manager(ops: &'a mut event_manager::EventOps<'_>) -> Self {
        EventOps {
            inner: Ops::Manager(ops),
        }
    }
}

/// A handler's token as the 32 bits of data the event manager keeps with a descriptor.
fn data(token: u64) -> io::Result<u32> {
    u32::try_from(token).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the token {token:#x} does not fit an event manager's 32 bits of data"),
        )
    })
}

/// Refuses a negative descriptor as epoll would (EBADF), before the event manager, which packs
/// it with the data into 64 bits, overflows on it.
fn valid(fd: RawFd) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(())
}

/// An event manager's error as an I/O error, with the OS error where there is one.
fn io_error(err: event_manager::Error) -> io::Error {
    match err {
        event_manager::Error::Epoll(errno) | event_manager::Error::EventFd(errno) => {
            io::Error::from_raw_os_error(errno.errno())
        }
        err => io::Error::other(err.to_string()),
    }
}

/// The subscriber the manager holds for one handler: the handler itself, taken back out when
/// the device stops, and why its initialisation failed, if it did.
struct Slot<H> {
    handler: Option<H>,
    init_error: Option<io::Error>,
}

impl<H: EventHandler> MutEventSubscriber for Slot<H> {
    fn process(&mut self, events: Events, ops: &mut event_manager::EventOps) {
        if let Some(handler) = self.handler.as_mut() {
            let mut ops = EventOps::manager(ops);
            handler.handle_event(&mut ops, u64::from(events.data()), events.event_set());
        }
    }

    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Some(handler) = self.handler.as_mut() {
            let mut ops = EventOps::manager(ops);
            if let Err(err) = handler.init(&mut ops) {
                self.init_error = Some(err);
            }
        }
    }
}

/// A handler an event manager serves.
pub(super) struct Managed<H> {
    name: String,
    endpoint: RemoteEndpoint<Subscriber>,
    id: SubscriberId,
    slot: Arc<Mutex<Slot<H>>>,
}

impl<H> fmt::Debug for Managed<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lock<H>(slot: &Mutex<Slot<H>>) -> MutexGuard<'_, Slot<H>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<H: EventHandler> Managed<H> {
    /// Adds `handler` to the manager behind `endpoint`, which initialises it on its loop's
    /// thread; a handler whose initialisation fails is removed at once and comes back.
    pub(super) fn start(
        name: String,
        handler: H,
        endpoint: &RemoteEndpoint<Subscriber>,
    ) -> Result<Self, SpawnError<H>> {
        let slot = Arc::new(Mutex::new(Slot {
            handler: Some(handler),
            init_error: None,
        }));
        let subscriber: Subscriber = slot.clone();
        let check = slot.clone();
        let added = endpoint.call_blocking(move |manager| {
            // Initialises the handler, which registers its descriptors.
            let id = manager.add_subscriber(subscriber);
            let init_error = lock(&check).init_error.take();
            Ok::<_, event_manager::Error>(match init_error {
                None => Ok(id),
                Some(err) => {
                    // Its descriptors go with it; the handler stays in the slot.
                    let _ = manager.remove_subscriber(id);
                    Err(err)
                }
            })
        });
        let error = match added {
            Ok(Ok(id)) => {
                return Ok(Managed {
                    name,
                    endpoint: endpoint.clone(),
                    id,
                    slot,
                });
            }
            Ok(Err(err)) => err,
            Err(err) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the event manager is gone: {}", io_error(err)),
            ),
        };
        // The manager no longer holds the subscriber (it removed it or never got it), and the
        // slot was given a handler that only the manager's loop takes out.
        let handler = lock(&slot)
            .handler
            .take()
            .expect("a handler that was never served is still in its slot");
        Err(SpawnError { error, handler })
    }

    /// Runs `f` with the handler on the manager's loop, between two events.
    pub(super) fn post<R, F>(&self, f: F) -> io::Result<Reply<R>>
    where
        R: Send + 'static,
        F: FnOnce(&mut H, &mut EventOps<'_>) -> R + Send + 'static,
    {
        let (reply, result) = mpsc::sync_channel(1);
        let slot = self.slot.clone();
        let id = self.id;
        self.endpoint
            .fire(move |manager| {
                // A subscriber already removed has no handler to run `f` with: dropping the
                // reply's sender tells the caller.
                let Ok(mut ops) = manager.event_ops(id) else {
                    return;
                };
                let mut slot = lock(&slot);
                let Some(handler) = slot.handler.as_mut() else {
                    return;
                };
                let mut ops = EventOps::manager(&mut ops);
                let _ = reply.send(f(handler, &mut ops));
            })
            .map_err(|_| gone())?;
        Ok(Reply(result))
    }

    /// Removes the subscriber, with its descriptors, and gives the handler back.
    pub(super) fn stop(self) -> io::Result<H> {
        let id = self.id;
        // A manager that is gone dropped the subscriber with it: the handler is back in the
        // slot either way.
        if let Err(err) = self
            .endpoint
            .call_blocking(move |manager| manager.remove_subscriber(id).map(drop))
        {
            log::debug!(
                "The event manager did not remove the handler of {}: {}",
                self.name,
                io_error(err)
            );
        }
        lock(&self.slot).handler.take().ok_or_else(gone)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    use event_manager::EventManager;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::worker::{Executor, Runner};

    /// Counts writes to an eventfd, and reports each count.
    struct Counter {
        evt: EventFd,
        token: u64,
        seen: u64,
        done: mpsc::Sender<u64>,
    }

    impl EventHandler for Counter {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(self.evt.as_raw_fd(), EventSet::IN, self.token)
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, token: u64, events: EventSet) {
            assert_eq!(token, self.token);
            assert!(events.contains(EventSet::IN));
            self.seen += self.evt.read().unwrap();
            self.done.send(self.seen).unwrap();
        }
    }

    fn counter(token: u64) -> (EventFd, mpsc::Receiver<u64>, Counter) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (done, seen) = mpsc::channel();
        let handler = Counter {
            evt: evt.try_clone().unwrap(),
            token,
            seen: 0,
            done,
        };
        (evt, seen, handler)
    }

    /// An event manager whose loop runs on a thread named `test-loop` until dropped.
    struct Loop {
        executor: Executor,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Loop {
        fn start() -> Self {
            let mut manager = EventManager::<Subscriber>::new().unwrap();
            let executor = Executor::from(manager.remote_endpoint());
            let stop = Arc::new(AtomicBool::new(false));
            let thread = thread::Builder::new()
                .name("test-loop".into())
                .spawn({
                    let stop = stop.clone();
                    move || {
                        while !stop.load(Ordering::SeqCst) {
                            manager.run_with_timeout(10).unwrap();
                        }
                    }
                })
                .unwrap();
            Loop {
                executor,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    #[test]
    fn the_managers_loop_serves_the_handler_and_its_calls_until_stopped() {
        let event_loop = Loop::start();
        let (evt, seen, handler) = counter(7);
        let runner = Runner::start("test".into(), handler, &event_loop.executor).unwrap();
        evt.write(2).unwrap();
        assert_eq!(seen.recv().unwrap(), 2);
        let (count, thread) = runner
            .call(|handler, _| {
                handler.seen += 10;
                (handler.seen, thread::current().name().map(String::from))
            })
            .unwrap();
        assert_eq!(count, 12);
        assert_eq!(thread.as_deref(), Some("test-loop"));
        let reply = runner.post(|handler, _| handler.seen + 1).unwrap();
        assert_eq!(reply.wait().unwrap(), 13);
        let handler = runner.stop().unwrap();
        assert_eq!(handler.seen, 12);
        // The descriptor left the manager with the handler: this write reaches nothing, and
        // the descriptor can be registered again.
        evt.write(1).unwrap();
        let (done, again) = mpsc::channel();
        let handler = Counter { done, ..handler };
        let runner = Runner::start("test".into(), handler, &event_loop.executor).unwrap();
        assert_eq!(again.recv().unwrap(), 13);
        assert!(seen.try_recv().is_err());
        runner.stop().unwrap();
    }

    #[test]
    fn a_call_may_change_what_the_handler_waits_on() {
        let event_loop = Loop::start();
        let (evt, seen, handler) = counter(3);
        let runner = Runner::start("test".into(), handler, &event_loop.executor).unwrap();
        runner
            .call(|handler, ops| ops.remove(handler.evt.as_raw_fd()))
            .unwrap()
            .unwrap();
        evt.write(1).unwrap();
        runner
            .call(|handler, ops| ops.add(handler.evt.as_raw_fd(), EventSet::IN, 3))
            .unwrap()
            .unwrap();
        // The count waiting in the eventfd is seen once the descriptor is back.
        assert_eq!(seen.recv().unwrap(), 1);
        runner.stop().unwrap();
    }

    /// Registers one good descriptor, then fails on a bad one.
    struct FailingInit {
        good: EventFd,
        id: u32,
    }

    impl EventHandler for FailingInit {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(self.good.as_raw_fd(), EventSet::IN, 1)?;
            // Far past any descriptor the process has open.
            ops.add(RawFd::MAX, EventSet::IN, 2)
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
    }

    #[test]
    fn a_handler_whose_init_fails_comes_back_and_leaves_nothing_registered() {
        let event_loop = Loop::start();
        let good = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let handler = FailingInit {
            good: good.try_clone().unwrap(),
            id: 9,
        };
        let err = Runner::start("test".into(), handler, &event_loop.executor).unwrap_err();
        assert_eq!(err.error.raw_os_error(), Some(libc::EBADF));
        assert_eq!(err.handler.id, 9);
        // The descriptor it registered first went with it.
        let (done, seen) = mpsc::channel();
        let handler = Counter {
            evt: good.try_clone().unwrap(),
            token: 4,
            seen: 0,
            done,
        };
        let runner = Runner::start("test".into(), handler, &event_loop.executor).unwrap();
        good.write(1).unwrap();
        assert_eq!(seen.recv().unwrap(), 1);
        runner.stop().unwrap();
    }

    #[test]
    fn negative_descriptors_are_refused_as_epoll_refuses_them() {
        let event_loop = Loop::start();
        let runner = Runner::start("test".into(), Idle, &event_loop.executor).unwrap();
        let errors = runner
            .call(|_, ops| {
                [
                    ops.add(-1, EventSet::IN, 0),
                    ops.modify(-1, EventSet::IN, 0),
                    ops.remove(-1),
                ]
                .map(|result| result.unwrap_err().raw_os_error())
            })
            .unwrap();
        assert_eq!(errors, [Some(libc::EBADF); 3]);
        runner.stop().unwrap();
    }

    /// A handler that waits on nothing.
    struct Idle;

    impl EventHandler for Idle {
        fn init(&mut self, _: &mut EventOps<'_>) -> io::Result<()> {
            Ok(())
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
    }

    #[test]
    fn tokens_past_32_bits_are_refused() {
        let event_loop = Loop::start();
        let (_, _, handler) = counter(1 << 32);
        let err = Runner::start("test".into(), handler, &event_loop.executor).unwrap_err();
        assert_eq!(err.error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_manager_that_is_gone_gives_the_handler_back() {
        let manager = EventManager::<Subscriber>::new().unwrap();
        let executor = Executor::from(manager.remote_endpoint());
        drop(manager);
        let (_, _, handler) = counter(5);
        let err = Runner::start("test".into(), handler, &executor).unwrap_err();
        assert_eq!(err.error.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(err.handler.token, 5);
    }
}
