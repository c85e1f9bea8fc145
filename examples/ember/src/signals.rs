//! SIGTERM and SIGINT as events of the VMM's event loop, so that they end `ember` cleanly.
//!
//! [`TerminationSignals::block`] blocks both signals in the calling thread and opens a signalfd
//! that reads them. Called in `main` before any other thread starts, it leaves the two signals
//! blocked in every thread (a thread inherits its creator's mask), so the kernel never runs a
//! default action that would kill `ember` mid-way: the signals wait in the signalfd until the
//! event loop reads them and stops the VM the way a guest power-off does (vCPUs stopped, terminal
//! restored, final metrics line; the API socket file is left). Other signals, such as the vCPU
//! kick signal (`SIGRTMIN`), are left as they are.
//!
//! `ember` then exits with status 128 + the signal's number, as a shell reports a process a
//! signal killed: 143 for SIGTERM, 130 for SIGINT.
//!
//! ```no_run
//! use ember_vmm::signals::TerminationSignals;
//!
//! // First thing in main: every thread started afterwards has both signals blocked.
//! let signals = TerminationSignals::block()?;
//! // Watch `signals.as_raw_fd()` for EPOLLIN; when it is readable:
//! if let Some(signal) = signals.read() {
//!     eprintln!("ember: stopped by {}", ember_vmm::signals::name(signal));
//! }
//! # Ok::<(), ember_vmm::signals::Error>(())
//! ```

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::c_int;

/// The signals that end `ember` cleanly.
pub const TERMINATION_SIGNALS: [c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Why the termination signals cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signal mask could not be changed.
    #[error("Cannot block SIGTERM and SIGINT")]
    Block(#[source] io::Error),
    /// The signalfd could not be created.
    #[error("Cannot create a signalfd for SIGTERM and SIGINT")]
    SignalFd(#[source] io::Error),
}

/// The result of setting up the termination signals.
pub type Result<T> = std::result::Result<T, Error>;

/// A signalfd that reads SIGTERM and SIGINT, blocked in the thread that created it.
#[derive(Debug)]
pub struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread, and in every thread it starts from now
    /// on, and opens a non-blocking signalfd for them.
    ///
    /// # Errors
    ///
    /// When the mask cannot be changed or the signalfd cannot be created.
    pub fn block() -> Result<TerminationSignals> {
        let set = signal_set();
        let old = std::ptr::null_mut();
        // SAFETY: `set` is a valid signal set; the old mask is not asked for.
        let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, old) };
        if blocked != 0 {
            return Err(Error::Block(io::Error::from_raw_os_error(blocked)));
        }
        let flags = libc::SFD_NONBLOCK | libc::SFD_CLOEXEC;
        // SAFETY: `set` is a valid signal set; -1 asks for a new fd, whose result is checked.
        let fd = unsafe { libc::signalfd(-1, &raw const set, flags) };
        if fd < 0 {
            return Err(Error::SignalFd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TerminationSignals { fd })
    }

    /// The next termination signal received, if one is waiting.
    pub fn read(&self) -> Option<c_int> {
        // SAFETY: `signalfd_siginfo` is plain data, for which all zeroes is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: `info` is a writable buffer of `size` bytes and `fd` a valid signalfd.
            let read = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&raw mut info).cast::<libc::c_void>(),
                    size,
                )
            };
            if usize::try_from(read).ok() == Some(size) {
                return c_int::try_from(info.ssi_signo).ok();
            }
            if read < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // EAGAIN: nothing is waiting.
            return None;
        }
    }
}

impl AsRawFd for TerminationSignals {
    /// The signalfd, readable when a signal is waiting: register it for `EPOLLIN`.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The name of a termination signal, as a shell spells it: `SIGTERM`, `SIGINT`, else `signal N`.
pub fn name(signal: c_int) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGINT => "SIGINT".to_string(),
        other => format!("signal {other}"),
    }
}

/// The exit status of `ember` stopped by `signal`: 128 + its number, as shells report a process a
/// signal killed.
pub fn exit_status(signal: c_int) -> u8 {
    u8::try_from(signal)
        .ok()
        .and_then(|number| number.checked_add(128))
        .unwrap_or(u8::MAX)
}

/// The set of [`TERMINATION_SIGNALS`].
fn signal_set() -> libc::sigset_t {
    // SAFETY: `sigset_t` is plain data; `sigemptyset` initialises it before it is used.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable signal set; both calls only fail for an invalid signal
    // number, and these are valid.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for signal in TERMINATION_SIGNALS {
            libc::sigaddset(&raw mut set, signal);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_signalfd() {
        // In a thread of its own, so that the test harness's threads keep their masks.
        std::thread::spawn(|| {
            let signals = TerminationSignals::block().unwrap();
            assert_eq!(signals.read(), None);
            for signal in TERMINATION_SIGNALS {
                // SAFETY: a signal to this very thread, which blocks it: it waits in the signalfd.
                let sent = unsafe { libc::pthread_kill(libc::pthread_self(), signal) };
                assert_eq!(sent, 0);
                assert_eq!(signals.read(), Some(signal));
            }
            assert_eq!(signals.read(), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_exit_status_is_128_plus_the_signal_as_shells_report_it() {
        assert_eq!(exit_status(libc::SIGTERM), 143);
        assert_eq!(exit_status(libc::SIGINT), 130);
        assert_eq!(exit_status(200), u8::MAX);
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
        assert_eq!(name(libc::SIGINT), "SIGINT");
        assert_eq!(name(9), "signal 9");
    }
}
