//! What a block device's data lives on: the [`BlockBackend`] trait, which [`RawFile`] (a raw
//! image file or a host block device) implements and a VMM can implement for any other store.
//!
//! The backend only moves bytes. Everything the guest controls is checked by the device before
//! a backend sees it: a request reaches the backend only once it parsed, lies inside the
//! capacity, is a whole number of sectors no longer than [`MAX_DATA_LEN`](super::MAX_DATA_LEN)
//! (or [`MAX_DISCARD_SECTORS`](super::MAX_DISCARD_SECTORS) for a discard or a write zeroes),
//! passed the rate limiter and, for a write, a discard or a write zeroes, is not for a
//! read-only device. The device writes the status byte, counts the request and marks guest
//! memory dirty; a backend cannot weaken any of that.
//!
//! [`RawFile`]: super::RawFile

use std::io;
use std::os::fd::BorrowedFd;

use vm_memory::GuestMemory;
use vm_memory::volatile_memory::VolatileSlice;

use crate::iov::GuestIoVecs;

/// The store behind a block device, addressed in bytes.
///
/// The device calls these methods on the thread that serves its queue, one request at a time,
/// with offsets and lengths it has checked: every range lies inside [`capacity`], starts and
/// ends on a 512-byte sector boundary, and is not empty. An error completes the request with
/// VIRTIO_BLK_S_IOERR (or VIRTIO_BLK_S_UNSUPP for an [`io::ErrorKind::Unsupported`] discard or
/// write zeroes); the device goes on serving the next one.
///
/// Discard and write zeroes are optional: a backend that has them says so with
/// [`supports_discard`] and [`supports_write_zeroes`], and only then does the device offer
/// VIRTIO_BLK_F_DISCARD and VIRTIO_BLK_F_WRITE_ZEROES. The device's own identity (its
/// read-only flag, the ID string GET_ID returns) is the device's configuration, not the
/// backend's; a backend only says whether it can write at all ([`read_only`]).
///
/// # Asynchronous backends
///
/// The methods are synchronous: each returns once its I/O is done, and the `iovec`s it is given
/// are valid only for the call. Requests in flight together are the device's asynchronous
/// engine ([`IoEngine::Async`](super::IoEngine::Async), [`AsyncIo`](super::AsyncIo)): a backend
/// whose bytes are those of a file at the same offsets says so with [`async_fd`], and the
/// device then submits reads, writes and flushes of that file to an io_uring, each with a
/// token, waits on the ring's completion eventfd in its event loop and reaps the completed
/// tokens, keeping each request's chain, and the guest memory mapped, until its completion.
/// Discards and write zeroes still go through this trait. The device-side checks stay where
/// they are, in front of either engine.
///
/// # Example
///
/// A disk in host memory, without discard or write zeroes, behind a writable device:
///
/// ```
/// use std::io;
/// use std::sync::Arc;
///
/// use ember_virtio::block::{self, Block, BlockBackend, copy_from_bufs, copy_to_bufs};
/// use ember_virtio::iov::GuestIoVecs;
/// use vm_memory::{GuestMemory, GuestMemoryMmap};
///
/// struct MemDisk(Vec<u8>);
///
/// impl MemDisk {
///     /// The bytes `offset..offset + len`; the device only asks for ranges on the disk.
///     fn range(&mut self, offset: u64, len: usize) -> io::Result<&mut [u8]> {
///         let start = usize::try_from(offset).map_err(io::Error::other)?;
///         let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
///         self.0.get_mut(start..end).ok_or(io::ErrorKind::UnexpectedEof.into())
///     }
/// }
///
/// impl BlockBackend for MemDisk {
///     fn capacity(&self) -> u64 {
///         self.0.len() as u64
///     }
///
///     fn read_vectored<M: GuestMemory + ?Sized>(
///         &mut self,
///         offset: u64,
///         bufs: &GuestIoVecs<'_, M>,
///     ) -> io::Result<()> {
///         copy_to_bufs(bufs, self.range(offset, bufs.len())?);
///         Ok(())
///     }
///
///     fn write_vectored<M: GuestMemory + ?Sized>(
///         &mut self,
///         offset: u64,
///         bufs: &GuestIoVecs<'_, M>,
///     ) -> io::Result<()> {
///         copy_from_bufs(bufs, self.range(offset, bufs.len())?);
///         Ok(())
///     }
///
///     fn flush(&mut self) -> io::Result<()> {
///         Ok(())
///     }
/// }
///
/// let block = Block::new(MemDisk(vec![0; 1 << 20]), block::Config::new("mem0")).unwrap();
/// assert_eq!(block.capacity(), 2048);
/// // A device a transport can host, for any guest memory type.
/// let features = ember_virtio::VirtioDevice::<Arc<GuestMemoryMmap>>::features(&block);
/// assert_eq!(features & (1 << 13), 0, "no VIRTIO_BLK_F_DISCARD");
/// ```
///
/// [`capacity`]: BlockBackend::capacity
/// [`supports_discard`]: BlockBackend::supports_discard
/// [`supports_write_zeroes`]: BlockBackend::supports_write_zeroes
/// [`read_only`]: BlockBackend::read_only
/// [`async_fd`]: BlockBackend::async_fd
pub trait BlockBackend: Send + 'static {
    /// The size of the store in bytes: a multiple of 512, which the device checks when it
    /// takes the backend. The device reads it then and keeps it; a store that grows or shrinks
    /// reaches the guest as a new backend ([`Block::update_disk`](super::Block::update_disk)).
    fn capacity(&self) -> u64;

    /// Whether the backend cannot write. A read-only backend can only back a read-only device.
    fn read_only(&self) -> bool {
        false
    }

    /// Fills every byte of `bufs` with the store's bytes from `offset` on.
    ///
    /// `bufs` are the guest buffers of a read, mapped in host memory ([`GuestIoVecs::iovecs`]
    /// for `preadv`; [`copy_to_bufs`] for a store in host memory).
    ///
    /// # Errors
    ///
    /// When not every byte could be read; any of the buffers may then have been written.
    fn read_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()>;

    /// Writes every byte of `bufs` to the store from `offset` on.
    ///
    /// `bufs` are the guest buffers of a write, mapped in host memory ([`GuestIoVecs::iovecs`]
    /// for `pwritev`; [`copy_from_bufs`] for a store in host memory). The guest may change them
    /// while the write goes on, as it may on real hardware.
    ///
    /// # Errors
    ///
    /// When not every byte could be written.
    fn write_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        offset: u64,
        bufs: &GuestIoVecs<'_, M>,
    ) -> io::Result<()>;

    /// The file the store's bytes are, at the same offsets, for the asynchronous engine
    /// ([`IoEngine::Async`](super::IoEngine::Async)) to read, write and `fdatasync` through
    /// io_uring in place of [`read_vectored`](BlockBackend::read_vectored),
    /// [`write_vectored`](BlockBackend::write_vectored) and [`flush`](BlockBackend::flush).
    /// `None` (the default) for a store that is not such a file: it backs only devices with the
    /// synchronous engine.
    fn async_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Makes every write completed so far durable.
    ///
    /// # Errors
    ///
    /// When the store cannot say the writes are durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Whether [`discard`](BlockBackend::discard) works; the device offers
    /// VIRTIO_BLK_F_DISCARD only then, and lets write zeroes ask to unmap.
    fn supports_discard(&self) -> bool {
        false
    }

    /// The granularity of discards, in 512-byte sectors, which the device advertises to the
    /// driver: the block size of the store. At least 1.
    fn discard_alignment(&self) -> u32 {
        1
    }

    /// Deallocates the `len` bytes at `offset`: they may read back as anything until written.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::Unsupported`] when the backend cannot discard (the default), which the
    /// device answers VIRTIO_BLK_S_UNSUPP; any other error is VIRTIO_BLK_S_IOERR.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Whether [`write_zeroes`](BlockBackend::write_zeroes) works; the device offers
    /// VIRTIO_BLK_F_WRITE_ZEROES only then.
    fn supports_write_zeroes(&self) -> bool {
        false
    }

    /// Makes the `len` bytes at `offset` read back as zeroes; with `unmap`, the driver allows
    /// deallocating them.
    ///
    /// # Errors
    ///
    /// As [`discard`](BlockBackend::discard).
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = (offset, len, unmap);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The host memory behind each of `bufs`' `iovec`s.
fn slices<'a, M: GuestMemory + ?Sized>(
    bufs: &'a GuestIoVecs<'_, M>,
) -> impl Iterator<Item = VolatileSlice<'a>> {
    bufs.iovecs().iter().map(|iov| {
        // SAFETY: a `GuestIoVecs` keeps the guest memory behind its `iovec`s mapped, read and
        // write, for as long as it lives, which the returned slice's lifetime is bound to; each
        // `iovec` covers `iov_len` bytes of it. The guest may change that memory at any time,
        // which volatile accesses allow.
        unsafe { VolatileSlice::new(iov.iov_base.cast(), iov.iov_len) }
    })
}

/// Copies `src` into `bufs`, in order, and returns the bytes copied: the shorter of the two.
///
/// For a backend whose store is in host memory, to serve a read
/// ([`BlockBackend::read_vectored`]) without touching raw `iovec`s. Only the buffers of a read
/// are for writing: the device marks those dirty for the VMM's dirty-page tracking, and no
/// others.
pub fn copy_to_bufs<M: GuestMemory + ?Sized>(bufs: &GuestIoVecs<'_, M>, src: &[u8]) -> usize {
    let mut done = 0usize;
    for slice in slices(bufs) {
        let Some(rest) = src.get(done..).filter(|rest| !rest.is_empty()) else {
            break;
        };
        let count = rest.len().min(slice.len());
        slice.copy_from(rest.get(..count).unwrap_or(&[]));
        done = done.saturating_add(count);
    }
    done
}

/// Copies `bufs`, in order, into `dst`, and returns the bytes copied: the shorter of the two.
///
/// For a backend whose store is in host memory, to serve a write
/// ([`BlockBackend::write_vectored`]) without touching raw `iovec`s.
pub fn copy_from_bufs<M: GuestMemory + ?Sized>(bufs: &GuestIoVecs<'_, M>, dst: &mut [u8]) -> usize {
    let mut done = 0usize;
    for slice in slices(bufs) {
        let Some(rest) = dst.get_mut(done..).filter(|rest| !rest.is_empty()) else {
            break;
        };
        let copied = slice.copy_to(rest);
        done = done.saturating_add(copied);
    }
    done
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, Permissions};

    use super::*;
    use crate::mock::guest_memory;
    use crate::queue::Descriptor;

    fn desc(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }

    #[test]
    fn copies_run_through_the_buffers_in_order_and_stop_at_the_shorter() {
        let mem = guest_memory(0x10000).unwrap();
        let descs = [desc(0x1000, 3), desc(0x3000, 5)];
        let bufs = GuestIoVecs::new(&mem, descs, Permissions::Write).unwrap();
        assert_eq!(copy_to_bufs(&bufs, b"abcdefghij"), 8);
        let mut back = [0u8; 5];
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(&back, b"defgh");
        assert_eq!(copy_to_bufs(&bufs, b"xy"), 2);
        mem.read_slice(&mut back[..3], GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&back[..3], b"xyc");

        let mut all = [0u8; 10];
        assert_eq!(copy_from_bufs(&bufs, &mut all), 8);
        assert_eq!(&all[..8], b"xycdefgh");
        let mut two = [0u8; 2];
        assert_eq!(copy_from_bufs(&bufs, &mut two), 2);
        assert_eq!(&two, b"xy");
    }
}
