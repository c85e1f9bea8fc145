//! A Linux TAP interface opened for a virtio-net device: Ethernet frames, each behind a 12-byte
//! `virtio_net_hdr_v1`, read from and written to `/dev/net/tun`.
//!
//! [`Tap::open`] creates the interface, or attaches to a persistent one of that name, with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: no packet information prefix, and the virtio-net header
//! in front of every frame so that checksum and segmentation offloads pass between the guest and
//! the host stack untouched. The descriptor is non-blocking and close-on-exec. Which offloads the
//! TAP may hand the guest is set with [`Tap::set_offload`] once the driver has negotiated them.
//!
//! Creating a TAP, or attaching to one the user does not own, needs `CAP_NET_ADMIN`.

use std::ffi::c_int;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The TUN/TAP control device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// The size of the virtio-net header in front of every frame: `virtio_net_hdr_v1`, which a
/// VERSION_1 device always uses.
pub const VNET_HDR_LEN: usize = 12;

/// [`VNET_HDR_LEN`] as TUNSETVNETHDRSZ takes it.
const VNET_HDR_SIZE: c_int = 12;
const _: () = assert!(VNET_HDR_SIZE as usize == VNET_HDR_LEN);

/// The longest interface name, in bytes (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Offload flag for [`Tap::set_offload`]: the TAP may hand over frames with a partial checksum.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// Offload flag for [`Tap::set_offload`]: the TAP may hand over TCP over IPv4 segments of up to
/// 64 KiB.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// Offload flag for [`Tap::set_offload`]: the TAP may hand over TCP over IPv6 segments of up to
/// 64 KiB.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// Offload flag for [`Tap::set_offload`]: the TCP segments may carry the ECN bits.
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;

/// Errors of opening and configuring a TAP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The interface name is empty.
    #[error("The TAP interface name is empty")]
    EmptyName,
    /// The interface name does not fit in `IFNAMSIZ`.
    #[error("The TAP interface name {name:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong {
        /// The name asked for.
        name: String,
    },
    /// The interface name is `.` or `..`, which Linux keeps for directories.
    #[error("The TAP interface name {name:?} is reserved")]
    ReservedName {
        /// The name asked for.
        name: String,
    },
    /// The interface name holds a character Linux does not allow in one.
    #[error("The TAP interface name {name:?} holds a NUL, '/' or white space character")]
    InvalidNameCharacter {
        /// The name asked for.
        name: String,
    },
    /// `/dev/net/tun` cannot be opened.
    #[error("Cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to create the TAP or attach to it (TUNSETIFF).
    #[error(
        "Cannot create or attach the TAP interface {name:?}: that needs CAP_NET_ADMIN, or a \
         persistent TAP owned by this user that no other process holds"
    )]
    CreateTap {
        /// The name asked for.
        name: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the virtio-net header size (TUNSETVNETHDRSZ).
    #[error("Cannot set the TAP's virtio-net header size to {VNET_HDR_LEN} bytes")]
    SetVnetHdrSize(#[source] io::Error),
    /// The kernel refused the offload flags (TUNSETOFFLOAD).
    #[error("Cannot set the TAP's offload flags to {flags:#x}")]
    SetOffload {
        /// The `TUN_F_*` flags asked for.
        flags: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Result of the TAP's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The part of `struct ifreq` that TUNSETIFF reads and writes: the name and the flags, padded to
/// the size of the whole union so that the kernel never reads past it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; IFREQ_PAD],
}

const IFREQ_PAD: usize = std::mem::size_of::<libc::ifreq>() - libc::IFNAMSIZ - 2;

// `IfReq` stands in for `struct ifreq`: the same size, the flags where `ifr_flags` is.
const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the TAP interface `name`, or attaches to the persistent one of that name, for
    /// frames behind a 12-byte virtio-net header. A name with `%d` lets the kernel pick the
    /// number; [`Tap::name`] says which it picked.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyName`], [`Error::NameTooLong`], [`Error::ReservedName`] or
    /// [`Error::InvalidNameCharacter`] before the kernel is asked anything; [`Error::OpenTun`],
    /// [`Error::CreateTap`] or [`Error::SetVnetHdrSize`] when the kernel refuses.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use ember_virtio::tap::{TUN_F_CSUM, Tap};
    ///
    /// let tap = Tap::open("ember%d")?;
    /// println!("opened {}", tap.name());
    /// tap.set_offload(TUN_F_CSUM)?;
    /// # Ok::<(), ember_virtio::tap::Error>(())
    /// ```
    pub fn open(name: &str) -> Result<Tap> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(Error::OpenTun)?;

        let mut ifreq = IfReq {
            name: [0; libc::IFNAMSIZ],
            // The flags are 0x0002 | 0x1000 | 0x4000, which fit in a c_short.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; IFREQ_PAD],
        };
        // `check_name` made sure the name leaves room for the terminating NUL.
        if let Some(dst) = ifreq.name.get_mut(..name.len()) {
            dst.copy_from_slice(name.as_bytes());
        }
        // SAFETY: `file` is an open /dev/net/tun; TUNSETIFF reads and writes one `struct ifreq`,
        // which `IfReq` is the size of, and the kernel keeps no pointer to it.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifreq) };
        if ret < 0 {
            return Err(Error::CreateTap {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }

        let hdr_len = VNET_HDR_SIZE;
        // SAFETY: `file` is a TAP; TUNSETVNETHDRSZ reads one int from the pointer it is given.
        let ret = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(Error::SetVnetHdrSize(io::Error::last_os_error()));
        }

        // The kernel wrote back the name it gave the interface, NUL-terminated.
        let len = ifreq
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ifreq.name.len());
        let name = String::from_utf8_lossy(ifreq.name.get(..len).unwrap_or_default()).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface's name, as the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Says which offloads the TAP may use in the frames it hands over: the `TUN_F_*` flags the
    /// guest can take ([`TUN_F_CSUM`] when it accepts partial checksums, [`TUN_F_TSO4`] and
    /// [`TUN_F_TSO6`] when it accepts large TCP segments, which need [`TUN_F_CSUM`]). Frames
    /// written to the TAP may use every offload whatever this says.
    ///
    /// # Errors
    ///
    /// [`Error::SetOffload`] when the kernel refuses the flags.
    pub fn set_offload(&self, flags: u32) -> Result<()> {
        let arg = libc::c_ulong::from(flags);
        // SAFETY: `self.file` is a TAP; TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD, arg) };
        if ret < 0 {
            return Err(Error::SetOffload {
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame, with its virtio-net header, into `buf`, and returns its length.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting, or the error `read(2)` gave.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame, with its virtio-net header, from `buf`, and returns the length written.
    ///
    /// # Errors
    ///
    /// The error `write(2)` gave: `EIO` while the interface is down, `EINVAL` for a header the
    /// kernel does not accept.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Checks an interface name the way Linux's `dev_valid_name` does, so that a bad name gets a
/// clear error without the kernel being asked.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::NameTooLong {
            name: name.to_owned(),
        });
    }
    if name == "." || name == ".." {
        return Err(Error::ReservedName {
            name: name.to_owned(),
        });
    }
    if name
        .chars()
        .any(|c| c == '\0' || c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(Error::InvalidNameCharacter {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_are_rejected_before_the_kernel_is_asked() {
        assert!(matches!(Tap::open(""), Err(Error::EmptyName)));
        let long = "a".repeat(libc::IFNAMSIZ);
        assert!(matches!(Tap::open(&long), Err(Error::NameTooLong { .. })));
        for name in ["tap\0x", "a/b", "ta p", "eth0:1"] {
            assert!(
                matches!(Tap::open(name), Err(Error::InvalidNameCharacter { .. })),
                "{name:?}"
            );
        }
        assert!(matches!(Tap::open(".."), Err(Error::ReservedName { .. })));
        // The longest name Linux takes passes the check.
        check_name(&"a".repeat(MAX_NAME_LEN)).unwrap();
        check_name("tap%d").unwrap();
    }

    #[test]
    fn errors_say_what_failed_without_repeating_their_source() {
        let err = Error::CreateTap {
            name: "tap0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let message = err.to_string();
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
        assert!(!message.contains("not permitted"), "{message}");
        assert!(std::error::Error::source(&err).is_some());
    }

    /// Why this process cannot create a TAP, if it cannot.
    fn cannot_create_taps() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not running as root".into());
        }
        if !std::path::Path::new(TUN_PATH).exists() {
            return Some(format!("{TUN_PATH} does not exist"));
        }
        None
    }

    #[test]
    fn open_creates_a_tap_that_reads_nothing_yet() {
        if let Some(why) = cannot_create_taps() {
            println!("skipped: cannot create a TAP here: {why}");
            return;
        }
        let tap = match Tap::open("embt%d") {
            Ok(tap) => tap,
            // A container may keep CAP_NET_ADMIN from root.
            Err(err @ (Error::OpenTun(_) | Error::CreateTap { .. })) => {
                println!("skipped: cannot create a TAP here: {err}");
                return;
            }
            Err(err) => panic!("{err}"),
        };
        assert!(tap.name().starts_with("embt"), "{}", tap.name());
        assert!(!tap.name().contains('%'));
        assert!(tap.as_raw_fd() >= 0);
        // SAFETY: F_GETFL and F_GETFD read the descriptor's flags.
        let (status, fd_flags) = unsafe {
            (
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        let mut buf = [0u8; 64];
        let err = tap.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // The interface is down, so the kernel takes no frame.
        let frame = [0u8; VNET_HDR_LEN + 60];
        assert_eq!(
            tap.write(&frame).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
    }
}
