//! Interrupt and notification delivery through eventfds.
//!
//! The devices of this crate signal their interrupt lines, and the VMM's events such as a reset
//! request, through vm-superio's [`Trigger`] trait. [`EventFdTrigger`] implements it on an
//! [`EventFd`]: the VMM registers the same eventfd with KVM as an irqfd for an interrupt line, or
//! waits on it in its event loop for a notification.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// A [`Trigger`] that adds 1 to an eventfd's counter each time it fires.
///
/// Reading the eventfd returns how many times the trigger fired since the last read and resets the
/// count; the eventfd is non-blocking, so a read when it has not fired fails with
/// [`io::ErrorKind::WouldBlock`].
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Creates a trigger on a new non-blocking eventfd.
    ///
    /// # Errors
    ///
    /// The `eventfd(2)` error when the process cannot create one (for example, out of file
    /// descriptors).
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(EventFdTrigger)
    }

    /// Returns a trigger on a duplicate of the same eventfd: firing either is seen by both.
    ///
    /// # Errors
    ///
    /// The `dup(2)` error when the descriptor cannot be duplicated.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(EventFdTrigger)
    }

    /// The eventfd, to register as an irqfd or in an event loop, or to read the count from.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Consumes the trigger, returning its eventfd.
    pub fn into_eventfd(self) -> EventFd {
        self.0
    }
}

impl From<EventFd> for EventFdTrigger {
    /// Wraps an existing eventfd; its blocking mode is kept as it is.
    fn from(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_adds_one_per_firing_and_clones_share_the_counter() {
        let trigger = EventFdTrigger::new().unwrap();
        let clone = trigger.try_clone().unwrap();
        trigger.trigger().unwrap();
        clone.trigger().unwrap();
        assert_eq!(trigger.eventfd().read().unwrap(), 2);
        assert_ne!(clone.as_raw_fd(), trigger.as_raw_fd());
    }

    #[test]
    fn unfired_trigger_reads_would_block() {
        let trigger = EventFdTrigger::new().unwrap();
        let err = trigger.eventfd().read().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn wrapped_eventfd_is_the_one_fired() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = EventFdTrigger::from(evt.try_clone().unwrap());
        trigger.trigger().unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        let back = trigger.into_eventfd();
        back.write(3).unwrap();
        assert_eq!(evt.read().unwrap(), 3);
    }
}
