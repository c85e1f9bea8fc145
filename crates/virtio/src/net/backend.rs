//! Where a virtio-net device's frames go: any non-blocking descriptor with datagram semantics,
//! one frame per read or write, each behind the 12-byte virtio-net header.
//!
//! [`Tap`] is the backend a VMM uses. A connected UNIX datagram socket ([`UnixDatagram`], one
//! end of a `socketpair`) behaves the same for reads and writes, so that the device can be
//! tested without `CAP_NET_ADMIN`: whatever the device writes, the peer reads as one datagram.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;

use vm_memory::GuestMemory;

use crate::iov::GuestIoVecs;
use crate::tap::Tap;

/// A descriptor that carries one Ethernet frame, behind its virtio-net header, per read and
/// per write.
///
/// The descriptor must be non-blocking: the device waits for it in its epoll loop, through
/// [`AsRawFd`], and never blocks in a read or a write.
pub trait NetBackend: AsRawFd + Send + 'static {
    /// Reads one frame, header included, into `buf`, and returns its length. A frame longer
    /// than `buf` may be reported with its full length, so that the device drops it rather than
    /// pass on a truncated one.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting; any other error means the
    /// backend cannot be read from.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes the frame, header included, that `frame` holds in guest memory, in one write
    /// straight from it (`write` or `writev`), and returns the length written.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when the backend cannot take the frame now (it then
    /// becomes writable later); any other error means this frame cannot be sent.
    fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> io::Result<usize>;

    /// Says which offloads (`TUN_F_*` flags) the frames read from the backend may use: those the
    /// driver said it can receive.
    ///
    /// # Errors
    ///
    /// When the backend cannot do what the flags ask.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// Whether the backend holds frames for the guest that its descriptor does not announce:
    /// frames a backend makes itself (a VMM's own answers to what the guest sends, as a
    /// metadata service's), waiting in memory rather than in the descriptor.
    ///
    /// The device asks after each transmission and after each pass over the receive queue, and
    /// then reads them with [`NetBackend::read_frame`] as it would a readable descriptor's: a
    /// backend that says true must hand them over there. The default is false: the descriptor
    /// becoming readable is the only sign of frames.
    fn has_pending_frames(&self) -> bool {
        false
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> io::Result<usize> {
        write_gathered(self.as_fd(), frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }
}

/// One end of a connected datagram socket pair: what the device writes, the peer reads as one
/// datagram, and each datagram the peer sends the device reads as one frame. Offloads are
/// accepted and ignored, since nothing on a socket looks at the header.
impl NetBackend for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call. With
        // MSG_TRUNC the kernel still writes at most that many, and returns the datagram's full
        // length.
        let ret = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    fn write_frame<M: GuestMemory + ?Sized>(
        &mut self,
        frame: &GuestIoVecs<'_, M>,
    ) -> io::Result<usize> {
        write_gathered(self.as_fd(), frame)
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the guest buffers `frame` maps to `fd` in one call: `write` when they are one piece
/// (a driver puts a small frame and its header in one buffer), which the kernel takes without
/// copying in an iovec array, and `writev` otherwise.
fn write_gathered<M: GuestMemory + ?Sized>(
    fd: BorrowedFd<'_>,
    frame: &GuestIoVecs<'_, M>,
) -> io::Result<usize> {
    let ret = match frame.iovecs() {
        // SAFETY: the iovec names guest memory that `frame` keeps mapped while it lives, which
        // is the whole call; write only reads through it.
        [iovec] => unsafe { libc::write(fd.as_raw_fd(), iovec.iov_base, iovec.iov_len) },
        iovecs => {
            let count = libc::c_int::try_from(iovecs.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
            // SAFETY: each iovec names guest memory that `frame` keeps mapped while it lives,
            // which is the whole call; writev only reads through them.
            unsafe { libc::writev(fd.as_raw_fd(), iovecs.as_ptr(), count) }
        }
    };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, Permissions};

    use super::*;
    use crate::mock::guest_memory;
    use crate::queue::Descriptor;

    #[test]
    fn a_socket_pair_carries_one_gathered_frame_per_datagram() {
        let (mut device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let mem = guest_memory(0x10000).unwrap();
        mem.write_slice(b"header", GuestAddress(0x100)).unwrap();
        mem.write_slice(b"+frame", GuestAddress(0x2000)).unwrap();
        let pieces = [
            Descriptor {
                addr: GuestAddress(0x100),
                len: 6,
                writable: false,
            },
            Descriptor {
                addr: GuestAddress(0x2000),
                len: 6,
                writable: false,
            },
        ];
        let frame = GuestIoVecs::new(&mem, pieces, Permissions::Read).unwrap();
        assert_eq!(device.write_frame(&frame).unwrap(), 12);
        let mut buf = [0u8; 32];
        assert_eq!(peer.recv(&mut buf).unwrap(), 12);
        assert_eq!(&buf[..12], b"header+frame");

        // One piece goes with a plain write, whole.
        let frame = GuestIoVecs::new(&mem, pieces.get(1).copied(), Permissions::Read).unwrap();
        assert_eq!(frame.iovecs().len(), 1);
        assert_eq!(device.write_frame(&frame).unwrap(), 6);
        assert_eq!(peer.recv(&mut buf).unwrap(), 6);
        assert_eq!(&buf[..6], b"+frame");

        peer.send(&[7u8; 40]).unwrap();
        let mut small = [0u8; 16];
        assert_eq!(
            device.read_frame(&mut small).unwrap(),
            40,
            "the full length"
        );
        assert_eq!(
            device.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        device.set_offload(u32::MAX).unwrap();
    }
}
