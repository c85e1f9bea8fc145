//! The kernel command line: built with its length checked, and written where the boot layout
//! says.
//!
//! Lines are linux-loader [`Cmdline`]s with a capacity of [`CMDLINE_MAX_SIZE`] bytes, the
//! terminating NUL included, so that a VMM can keep adding to one (for example with
//! [`Cmdline::add_virtio_mmio_device`]) and still never exceed what the guest reserves for it.

use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::CMDLINE_MAX_SIZE;

/// Errors of command line construction and loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line and its NUL do not fit in the space the guest reserves for it.
    #[error(
        "The kernel command line needs {len} bytes with its terminating NUL, more than the \
         {CMDLINE_MAX_SIZE} available"
    )]
    TooLong {
        /// Bytes the command line needs, NUL included.
        len: usize,
    },
    /// A part of the command line is not a valid kernel argument string.
    #[error("The kernel command line argument {arg:?} is invalid")]
    InvalidArgument {
        /// The rejected part.
        arg: String,
        /// Why it was rejected.
        #[source]
        source: CmdlineError,
    },
    /// The command line could not be rendered as a C string.
    #[error("The kernel command line cannot be rendered as a C string")]
    Render(#[source] CmdlineError),
    /// The command line could not be written to guest memory.
    #[error("Cannot write the kernel command line to guest memory at {addr:#x}")]
    Write {
        /// Where the line goes.
        addr: u64,
        /// Why the write failed.
        #[source]
        source: GuestMemoryError,
    },
}

/// Result type of command line construction and loading.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a command line from `base` (which may hold init arguments after ` -- `) followed by
/// the `extra` arguments, which go before any init arguments.
///
/// The returned line has a capacity of [`CMDLINE_MAX_SIZE`] bytes including its NUL.
///
/// # Errors
///
/// [`Error::TooLong`] naming the needed size when the result would not fit;
/// [`Error::InvalidArgument`] when a part holds characters other than printable ASCII, or
/// misplaced quotes, or when the line would hold init arguments and no boot argument.
///
/// # Example
///
/// ```
/// let cmdline = ember_boot::build_cmdline("console=ttyS0 -- init-arg", &["reboot=k"])?;
/// assert_eq!(
///     cmdline.as_cstring().unwrap().as_bytes(),
///     b"console=ttyS0 reboot=k -- init-arg"
/// );
/// assert!(ember_boot::build_cmdline(&"a".repeat(2048), &[]).is_err());
/// # Ok::<(), ember_boot::cmdline::Error>(())
/// ```
pub fn build_cmdline(base: &str, extra: &[&str]) -> Result<Cmdline> {
    match build_with_capacity(base, extra, CMDLINE_MAX_SIZE) {
        // A base line longer than the capacity fails in `Cmdline::try_from` with
        // `InvalidCapacity`, a longer line made of several parts in `insert_str` with `TooLarge`.
        Err(Error::InvalidArgument {
            source: CmdlineError::TooLarge | CmdlineError::InvalidCapacity,
            ..
        }) => {
            // Built again without a limit, to report how long the line would be.
            let unbounded = build_with_capacity(base, extra, usize::MAX)?;
            let len = unbounded
                .as_cstring()
                .map_err(Error::Render)?
                .as_bytes_with_nul()
                .len();
            Err(Error::TooLong { len })
        }
        built => built,
    }
}

fn build_with_capacity(base: &str, extra: &[&str], capacity: usize) -> Result<Cmdline> {
    let invalid = |arg: &str| {
        let arg = arg.to_string();
        move |source| Error::InvalidArgument { arg, source }
    };
    // `Cmdline::try_from` takes the base line as it is; the extra arguments `insert_str` checks.
    if !base.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid(base)(CmdlineError::InvalidAscii));
    }
    let mut line = Cmdline::try_from(base, capacity).map_err(invalid(base))?;
    for arg in extra {
        line.insert_str(arg).map_err(invalid(arg))?;
    }
    // linux-loader takes init arguments without boot arguments (`-- init`) but cannot render
    // the line it makes of them: refuse it now rather than when it is loaded.
    match line.as_cstring() {
        Ok(_) => Ok(line),
        Err(source @ CmdlineError::NoBootArgsInserted) => Err(invalid(base)(source)),
        Err(source) => Err(Error::Render(source)),
    }
}

/// Writes `cmdline` with its NUL at `addr` (the [`BootLayout`](crate::BootLayout)'s `cmdline`)
/// and returns the number of bytes written.
///
/// # Errors
///
/// [`Error::TooLong`] when the line (built with a larger capacity than [`build_cmdline`] gives)
/// does not fit in [`CMDLINE_MAX_SIZE`]; [`Error::Write`] when guest memory does not hold it.
pub fn load_cmdline<M: GuestMemory>(
    mem: &M,
    cmdline: &Cmdline,
    addr: GuestAddress,
) -> Result<usize> {
    let rendered = cmdline.as_cstring().map_err(Error::Render)?;
    let bytes = rendered.as_bytes_with_nul();
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(Error::TooLong { len: bytes.len() });
    }
    mem.write_slice(bytes, addr)
        .map_err(|source| Error::Write {
            addr: addr.0,
            source,
        })?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::CMDLINE_START;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn extra_arguments_follow_the_base() {
        let line = build_cmdline("console=ttyS0 panic=1", &["reboot=k", "pci=off"]).unwrap();
        assert_eq!(
            line.as_cstring().unwrap().as_bytes(),
            b"console=ttyS0 panic=1 reboot=k pci=off"
        );
    }

    #[test]
    fn init_arguments_stay_last() {
        let line = build_cmdline("quiet -- --verbose", &["reboot=k"]).unwrap();
        assert_eq!(
            line.as_cstring().unwrap().as_bytes(),
            b"quiet reboot=k -- --verbose"
        );
    }

    #[test]
    fn longest_line_fits_exactly() {
        let base = "a".repeat(CMDLINE_MAX_SIZE - 1);
        let line = build_cmdline(&base, &[]).unwrap();
        assert_eq!(
            line.as_cstring().unwrap().as_bytes_with_nul().len(),
            CMDLINE_MAX_SIZE
        );
    }

    #[test]
    fn too_long_line_is_rejected_with_its_length() {
        let base = "a".repeat(CMDLINE_MAX_SIZE - 4);
        // base + " bbbb" + NUL = 2048 - 4 + 5 + 1.
        let err = build_cmdline(&base, &["bbbb"]).unwrap_err();
        assert!(matches!(err, Error::TooLong { len } if len == CMDLINE_MAX_SIZE + 2));
        assert!(err.to_string().contains("2050 bytes"), "{err}");
    }

    #[test]
    fn too_long_base_alone_is_rejected_with_its_length() {
        let err = build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE), &[]).unwrap_err();
        assert!(matches!(err, Error::TooLong { len } if len == CMDLINE_MAX_SIZE + 1));
    }

    #[test]
    fn base_with_nul_control_or_non_ascii_characters_is_rejected() {
        for base in [
            "console=ttyS0 \0\0 panic=0",
            "\x1a",
            "a\tb",
            "\x1b[2J",
            "caf\u{e9}",
        ] {
            let err = build_cmdline(base, &[]).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument { ref arg, source: CmdlineError::InvalidAscii } if arg == base
                ),
                "{base:?}: {err:?}"
            );
        }
    }

    #[test]
    fn built_line_keeps_its_capacity_for_later_additions() {
        let mut line = build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE - 3), &[]).unwrap();
        assert!(line.insert_str("b").is_ok());
        assert!(line.insert_str("c").is_err());
    }

    #[test]
    fn init_arguments_without_boot_arguments_are_rejected() {
        // Found by fuzzing: linux-loader builds such a line, then cannot render it.
        for base in [" -- --verbose", "  -- init", "   --   x"] {
            let err = build_cmdline(base, &[]).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument { ref arg, source: CmdlineError::NoBootArgsInserted }
                        if arg == base
                ),
                "{base:?}: {err:?}"
            );
        }
        // An extra argument is a boot argument: the line renders.
        let line = build_cmdline(" -- init", &["reboot=k"]).unwrap();
        assert_eq!(line.as_cstring().unwrap().as_bytes(), b"reboot=k -- init");
    }

    #[test]
    fn non_printable_argument_is_rejected() {
        let err = build_cmdline("console=ttyS0", &["bad\targ"]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref arg, .. } if arg == "bad\targ"));
    }

    #[test]
    fn loaded_line_is_nul_terminated_at_its_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[0xff; 32], GuestAddress(CMDLINE_START))
            .unwrap();
        let line = build_cmdline("console=ttyS0", &[]).unwrap();
        assert_eq!(
            load_cmdline(&mem, &line, GuestAddress(CMDLINE_START)).unwrap(),
            14
        );
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn loading_an_oversized_line_is_rejected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let line = Cmdline::try_from(&"a".repeat(CMDLINE_MAX_SIZE), 4096).unwrap();
        let err = load_cmdline(&mem, &line, GuestAddress(CMDLINE_START)).unwrap_err();
        assert!(matches!(err, Error::TooLong { len } if len == CMDLINE_MAX_SIZE + 1));
    }
}
