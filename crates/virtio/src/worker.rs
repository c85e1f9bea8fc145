//! The thread that serves an active device: an epoll loop over the device's file descriptors
//! (queue notification eventfds, backend sockets or TAPs), calling the device's [`EventHandler`]
//! for each event until the device is reset.
//!
//! The handler registers its descriptors with [`EventOps`] and may change what it waits for at
//! any event: a network device stops watching its TAP while the guest has no receive buffers, so
//! that a waiting frame does not make the loop spin.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The token the worker keeps for its own stop eventfd; handlers use any other.
pub const STOP_TOKEN: u64 = u64::MAX;

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

/// Changes to the set of descriptors a worker waits on.
#[derive(Debug)]
pub struct EventOps<'a> {
    epoll: &'a Epoll,
}

impl EventOps<'_> {
    /// Waits for `events` on `fd`, reported with `token`.
    ///
    /// # Errors
    ///
    /// When epoll refuses the descriptor.
    pub fn add(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.ctl(ControlOperation::Add, fd, events, token)
    }

    /// Changes the events waited for on `fd`, already added.
    ///
    /// # Errors
    ///
    /// When epoll refuses the change.
    pub fn modify(&mut self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, events, token)
    }

    /// Stops waiting on `fd`.
    ///
    /// # Errors
    ///
    /// When `fd` was not added.
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, EventSet::empty(), 0)
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }
}

/// A thread running an [`EventHandler`] until [`Worker::stop`].
pub struct Worker<H> {
    stop: EventFd,
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
    /// Registers the handler's descriptors and starts the thread, named `name`.
    ///
    /// # Errors
    ///
    /// When the epoll instance or the stop eventfd cannot be created, the handler's
    /// [`EventHandler::init`] fails, or the thread cannot be spawned; the handler comes back in
    /// the [`SpawnError`].
    pub fn spawn(name: String, mut handler: H) -> Result<Self, SpawnError<H>> {
        let setup = |handler: &mut H| -> io::Result<(Epoll, EventFd)> {
            let epoll = Epoll::new()?;
            let stop = EventFd::new(libc::EFD_NONBLOCK)?;
            let mut ops = EventOps { epoll: &epoll };
            ops.add(stop.as_raw_fd(), EventSet::IN, STOP_TOKEN)?;
            handler.init(&mut ops)?;
            Ok((epoll, stop))
        };
        let (epoll, stop) = match setup(&mut handler) {
            Ok(ready) => ready,
            Err(error) => return Err(SpawnError { error, handler }),
        };
        // The handler goes to the thread only once it runs: a thread that cannot be spawned
        // would drop whatever it had been given.
        let (give, take) = mpsc::sync_channel::<H>(1);
        let spawned = thread::Builder::new().name(name).spawn(move || {
            // The sender is dropped without sending only when `spawn` failed, and then this
            // thread does not run.
            match take.recv() {
                Ok(handler) => Some(run(&epoll, handler)),
                Err(_) => None,
            }
        });
        match spawned {
            Ok(thread) => match give.send(handler) {
                Ok(()) => Ok(Worker { stop, thread }),
                // Cannot happen: the thread holds the receiver until it has the handler.
                Err(mpsc::SendError(handler)) => Err(SpawnError {
                    error: io::Error::other("the device worker thread ended before it started"),
                    handler,
                }),
            },
            Err(error) => Err(SpawnError { error, handler }),
        }
    }

    /// Stops the thread after the event it is handling, and returns the handler.
    ///
    /// # Errors
    ///
    /// When the stop eventfd cannot be written or the thread panicked.
    pub fn stop(self) -> io::Result<H> {
        self.stop.write(1)?;
        self.thread
            .join()
            .ok()
            .flatten()
            .ok_or_else(|| io::Error::other("the device worker thread panicked"))
    }
}

fn run<H: EventHandler>(epoll: &Epoll, mut handler: H) -> H {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                log::error!("A device worker stopped: epoll_wait failed: {err}");
                return handler;
            }
        };
        for event in events.iter().take(count) {
            if event.data() == STOP_TOKEN {
                return handler;
            }
            let mut ops = EventOps { epoll };
            handler.handle_event(&mut ops, event.data(), event.event_set());
        }
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
        let worker = Worker::spawn("test-worker".into(), handler).unwrap();
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

    /// A handler whose descriptor epoll refuses; it carries a value to recognise it by.
    struct FailingInit(u32);

    impl EventHandler for FailingInit {
        fn init(&mut self, ops: &mut EventOps<'_>) -> io::Result<()> {
            ops.add(-1, EventSet::IN, 0)
        }

        fn handle_event(&mut self, _: &mut EventOps<'_>, _: u64, _: EventSet) {}
    }

    #[test]
    fn a_handler_whose_init_fails_is_not_started_and_comes_back() {
        let err = Worker::spawn("test-worker".into(), FailingInit(7)).unwrap_err();
        assert_eq!(err.error.raw_os_error(), Some(libc::EBADF));
        assert_eq!(err.handler.0, 7);
    }
}
