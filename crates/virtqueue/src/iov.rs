//! Guest buffers as host `iovec`s, so that a device moves data between guest memory and a file
//! or a TAP with one `preadv`/`pwritev`/`readv`/`writev` and no copy.
//!
//! [`GuestIoVecs`] borrows guest memory for as long as it lives, so the host addresses it hands
//! out stay mapped; data the host writes into guest memory through them is marked dirty with
//! [`GuestIoVecs::mark_written`].

use std::fmt;

use smallvec::SmallVec;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::guest;
use crate::queue::Descriptor;

/// The most `iovec`s one `readv`/`writev` takes (Linux's `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// How many pieces [`GuestIoVecs`] holds without allocating: as many as a chain has inline.
const INLINE: usize = 4;

/// Guest buffers, validated and mapped, as a list of host `iovec`s.
pub struct GuestIoVecs<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    /// The guest range behind each `iovec`, to mark what the host wrote dirty.
    ranges: SmallVec<[(GuestAddress, usize); INLINE]>,
    // Keep the host mappings behind `iovecs` alive (they matter for backends that map guest
    // memory on demand).
    _guards: SmallVec<[PtrGuardMut; INLINE]>,
    iovecs: SmallVec<[libc::iovec; INLINE]>,
    len: usize,
}

impl<M: GuestMemory + ?Sized> fmt::Debug for GuestIoVecs<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestIoVecs")
            .field("ranges", &self.ranges)
            .field("len", &self.len)
            .finish()
    }
}

impl<'a, M: GuestMemory + ?Sized> GuestIoVecs<'a, M> {
    /// Maps `descriptors` for `access`: each buffer becomes one `iovec` per guest memory region
    /// it lies in; empty buffers are left out.
    ///
    /// # Errors
    ///
    /// When a buffer is not inside guest memory.
    pub fn new(
        mem: &'a M,
        descriptors: impl IntoIterator<Item = Descriptor>,
        access: Permissions,
    ) -> Result<Self, GuestMemoryError> {
        let mut iov = GuestIoVecs {
            mem,
            ranges: SmallVec::new(),
            _guards: SmallVec::new(),
            iovecs: SmallVec::new(),
            len: 0,
        };
        for desc in descriptors {
            let count = usize::try_from(desc.len)
                .map_err(|_| GuestMemoryError::InvalidGuestAddress(desc.addr))?;
            if count == 0 {
                continue;
            }
            // Most buffers lie in one region, reached directly.
            if let Some(slice) = guest::region_slice(mem, desc.addr, count) {
                iov.push(desc.addr, slice.ptr_guard_mut());
                continue;
            }
            let mut addr = desc.addr;
            for slice in mem.get_slices(desc.addr, count, access)? {
                let slice = slice?;
                let len = u64::try_from(slice.len()).unwrap_or(u64::MAX);
                iov.push(addr, slice.ptr_guard_mut());
                // The pieces together are the buffer, whose end was checked to fit.
                addr = addr.checked_add(len).unwrap_or(addr);
            }
        }
        Ok(iov)
    }

    fn push(&mut self, addr: GuestAddress, guard: PtrGuardMut) {
        self.iovecs.push(libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: guard.len(),
        });
        self.ranges.push((addr, guard.len()));
        self.len = self.len.saturating_add(guard.len());
        self._guards.push(guard);
    }

    /// The `iovec`s, in buffer order. Their memory stays mapped while `self` lives.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffers hold no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first bytes of the buffers into `buf`, as many as both hold, through
    /// vm-memory's volatile accessors, and returns how many: so that a backend may look at a
    /// frame (its headers, or the whole of it) without a reference into guest memory.
    ///
    /// # Errors
    ///
    /// When guest memory cannot be read.
    pub fn copy_to(&self, buf: &mut [u8]) -> Result<usize, GuestMemoryError> {
        let mut copied = 0usize;
        for &(addr, len) in &self.ranges {
            let Some(dst) = buf.get_mut(copied..) else {
                break;
            };
            if dst.is_empty() {
                break;
            }
            let n = dst.len().min(len);
            guest::read_slice(self.mem, &mut dst[..n], addr)?;
            copied += n;
        }
        Ok(copied)
    }

    /// Marks the first `count` bytes dirty, after the host wrote them through the `iovec`s
    /// (writes through raw host addresses bypass vm-memory's dirty tracking).
    pub fn mark_written(&self, count: usize) {
        let mut left = count;
        for &(addr, len) in &self.ranges {
            if left == 0 {
                break;
            }
            let n = left.min(len);
            guest::mark_dirty(self.mem, addr, n);
            left -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    #[test]
    fn buffers_across_regions_become_one_iovec_per_region() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let iov = GuestIoVecs::new(
            &mem,
            [
                desc(0xff0, 0x20, true),
                desc(0x1800, 0, true),
                desc(0x100, 4, true),
            ],
            Permissions::Write,
        )
        .unwrap();
        assert_eq!(iov.iovecs().len(), 3);
        assert_eq!(iov.len(), 0x24);
        let lens: Vec<usize> = iov.iovecs().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [0x10, 0x10, 4]);
    }

    #[test]
    fn copy_to_gathers_the_buffers_up_to_the_room_given() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(b"across", GuestAddress(0xffd)).unwrap();
        mem.write_slice(b"+next", GuestAddress(0x100)).unwrap();
        let iov = GuestIoVecs::new(
            &mem,
            [desc(0xffd, 6, false), desc(0x100, 5, false)],
            Permissions::Read,
        )
        .unwrap();
        let mut all = [0u8; 16];
        assert_eq!(iov.copy_to(&mut all).unwrap(), 11);
        assert_eq!(&all[..11], b"across+next");
        let mut head = [0u8; 4];
        assert_eq!(iov.copy_to(&mut head).unwrap(), 4);
        assert_eq!(&head, b"acro");
        assert_eq!(iov.copy_to(&mut []).unwrap(), 0);
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = GuestIoVecs::new(&mem, [desc(0xff0, 0x20, false)], Permissions::Read);
        assert!(err.is_err());
    }

    #[test]
    fn a_host_read_through_the_iovecs_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let mut file = crate::mock::scratch_file().unwrap();
        file.write_all(b"hello, guest").unwrap();
        let iov = GuestIoVecs::new(
            &mem,
            [desc(0x100, 5, true), desc(0x1000, 7, true)],
            Permissions::Write,
        )
        .unwrap();
        // SAFETY: the iovecs point at `iov.len()` bytes of guest memory that `iov` keeps mapped.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.iovecs().as_ptr(),
                i32::try_from(iov.iovecs().len()).unwrap(),
                0,
            )
        };
        assert_eq!(n, 12);
        iov.mark_written(12);
        let mut a = [0u8; 5];
        let mut b = [0u8; 7];
        mem.read_slice(&mut a, GuestAddress(0x100)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!((&a, &b), (b"hello", b", guest"));
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello, guest");
    }
}
