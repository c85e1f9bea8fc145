//! A split virtqueue (virtio 1.x, section 2.7), device side, hardened against a malicious guest.
//!
//! The guest driver owns three rings in guest memory: the descriptor table, the available ring
//! and the used ring. The device, through [`Queue`], takes descriptor chains that the driver made
//! available with [`Queue::pop`] and hands them back with [`Queue::add_used`].
//!
//! Everything the guest wrote is untrusted: each descriptor is read once into a local copy and
//! validated before use, every index is bounds-checked, every address and length is added with
//! checked arithmetic and checked against guest memory, and the rings are only ever accessed
//! through vm-memory's volatile accessors.
//!
//! A chain is never longer than the queue (virtio 1.2, 2.7.5.3.1): its buffers, those of an
//! indirect table included, count against one budget of the queue size, so that a loop, or a
//! chain that hops into an indirect table after a long run of direct descriptors, ends with
//! [`Error::ChainTooLong`] after at most `size + 1` descriptor reads. An indirect table holds
//! at most the queue size of entries, and INDIRECT descriptors are refused unless the driver
//! negotiated VIRTIO_RING_F_INDIRECT_DESC ([`Queue::set_indirect`]).

use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{
    Address, AtomicAccess, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError,
    Permissions,
};

use smallvec::SmallVec;

use crate::guest;

/// Size in bytes of one descriptor in a descriptor table.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Size in bytes of one element of the used ring.
pub const USED_ELEMENT_SIZE: u64 = 8;
/// Alignment the spec requires of the descriptor table.
pub const DESC_TABLE_ALIGN: u64 = 16;
/// Alignment the spec requires of the available ring.
pub const AVAIL_RING_ALIGN: u64 = 2;
/// Alignment the spec requires of the used ring.
pub const USED_RING_ALIGN: u64 = 4;
/// The largest queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

// The ring flags fit in the 16-bit `flags` fields; the bindings publish them as u32.
const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
const AVAIL_F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

// Offsets inside the rings: both start with a 16-bit `flags` and a 16-bit `idx`.
const RING_IDX_OFFSET: u64 = 2;
const RING_ENTRIES_OFFSET: u64 = 4;
const AVAIL_ENTRY_SIZE: u64 = 2;

/// Errors of the virtqueue.
///
/// Every error other than [`Error::GuestMemory`] means the guest driver broke the virtio
/// protocol; a device normally answers it by setting DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue was used before the driver set it ready.
    #[error("The queue is not ready")]
    NotReady,
    /// The configured queue size is zero, not a power of two, or above the maximum.
    #[error("The queue size {size} is not a power of two between 1 and {max}")]
    InvalidSize {
        /// The configured size.
        size: u16,
        /// The maximum size of this queue.
        max: u16,
    },
    /// A ring's address does not have the alignment the spec requires.
    #[error("The {ring} at {addr:#x} is not aligned to {align} bytes")]
    MisalignedRing {
        /// Which ring.
        ring: Ring,
        /// Its guest physical address.
        addr: u64,
        /// The required alignment.
        align: u64,
    },
    /// A ring does not fit in guest memory.
    #[error("The {ring} at {addr:#x} does not fit in guest memory")]
    RingOutsideMemory {
        /// Which ring.
        ring: Ring,
        /// Its guest physical address.
        addr: u64,
    },
    /// The driver's available index is more than a queue size ahead of the device's.
    #[error(
        "The available index {avail_idx} is more than the queue size {size} ahead of the next \
         index to process, {next_avail}"
    )]
    AvailIdxTooFar {
        /// The available index the driver published.
        avail_idx: u16,
        /// The next available ring entry the device would process.
        next_avail: u16,
        /// The queue size.
        size: u16,
    },
    /// The available ring names a chain head outside the descriptor table.
    #[error("The chain head index {index} is outside the descriptor table of {size} entries")]
    HeadIndexOutOfRange {
        /// The head index read from the available ring.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` field points outside its table.
    #[error("The next descriptor index {index} is outside the table of {table_len} entries")]
    NextIndexOutOfRange {
        /// The index read from the `next` field.
        index: u16,
        /// The number of entries in the table being walked.
        table_len: u32,
    },
    /// A chain has more buffers than the queue size, indirect ones included, or it loops.
    #[error("The descriptor chain is longer than the queue size of {ttl}")]
    ChainTooLong {
        /// The largest number of buffers a chain may hold: the queue size.
        ttl: u32,
    },
    /// An indirect table's length is zero, not a multiple of 16, or of more descriptors than
    /// the queue size.
    #[error(
        "The indirect descriptor table length {len} is not a non-zero multiple of 16 bytes of at \
         most {max} descriptors"
    )]
    InvalidIndirectTableLength {
        /// The length in bytes from the indirect descriptor.
        len: u32,
        /// The most descriptors a table may hold: the queue size.
        max: u16,
    },
    /// A descriptor has the INDIRECT flag, but the driver did not negotiate
    /// VIRTIO_RING_F_INDIRECT_DESC.
    #[error("An indirect descriptor was used without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table holds another indirect descriptor.
    #[error("An indirect descriptor table holds another indirect descriptor")]
    NestedIndirect,
    /// A descriptor has both the INDIRECT and the NEXT flag.
    #[error("A descriptor has both the INDIRECT and the NEXT flag")]
    IndirectWithNext,
    /// An indirect table does not fit in guest memory.
    #[error("The indirect descriptor table at {addr:#x} of {len} bytes is outside guest memory")]
    IndirectTableOutsideMemory {
        /// The table's guest physical address.
        addr: u64,
        /// The table's length in bytes.
        len: u32,
    },
    /// A buffer's end address does not fit in 64 bits.
    #[error("The buffer at {addr:#x} of {len} bytes wraps around the address space")]
    BufferOverflow {
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length in bytes.
        len: u32,
    },
    /// A buffer does not fit in guest memory.
    #[error("The buffer at {addr:#x} of {len} bytes is outside guest memory")]
    BufferOutsideMemory {
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length in bytes.
        len: u32,
    },
    /// The lengths of a chain's buffers add up to more than `u32::MAX`.
    #[error("The total length of the descriptor chain does not fit in 32 bits")]
    ChainLengthOverflow,
    /// A device-readable descriptor follows a device-writable one (spec 2.7.4.2).
    #[error("A device-readable descriptor follows a device-writable one in the chain")]
    ReadableAfterWritable,
    /// Accessing the rings or buffers in guest memory failed.
    #[error("Cannot access the virtqueue in guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

impl From<GuestMemoryError> for Error {
    fn from(error: GuestMemoryError) -> Self {
        Error::GuestMemory(error)
    }
}

/// Result of the virtqueue's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The three areas of a split virtqueue, to say which one an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table.
    DescriptorTable,
    /// The available (driver) ring.
    AvailRing,
    /// The used (device) ring.
    UsedRing,
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::DescriptorTable => "descriptor table",
            Ring::AvailRing => "available ring",
            Ring::UsedRing => "used ring",
        })
    }
}

/// One validated buffer of a descriptor chain.
///
/// `addr..addr + len` lies inside guest memory; the descriptor it came from is no longer read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device writes the buffer (true) or reads it (false).
    pub writable: bool,
}

/// A descriptor as the guest wrote it, copied out of guest memory once.
#[derive(Clone, Copy, Debug)]
struct RawDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl RawDescriptor {
    /// The descriptor in its two little-endian words, as the table holds it: the address,
    /// then the length, the flags and the next index.
    fn from_le_words([addr, rest]: [u64; 2]) -> Self {
        let [l0, l1, l2, l3, f0, f1, n0, n1] = u64::from_le(rest).to_le_bytes();
        RawDescriptor {
            addr: u64::from_le(addr),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A descriptor table being walked: the guest-supplied table and how many entries it holds.
struct Table<'m, M: GuestMemory + ?Sized> {
    area: Area<'m, M>,
    len: u32,
}

impl<M: GuestMemory + ?Sized> Table<'_, M> {
    /// Reads entry `index` once, after checking it lies inside the table.
    fn read(&self, mem: &M, index: u16) -> Result<RawDescriptor> {
        if u32::from(index) >= self.len {
            return Err(Error::NextIndexOutOfRange {
                index,
                table_len: self.len,
            });
        }
        // Read as two words, a load each.
        let words: [u64; 2] = self.area.read(mem, u64::from(index) * DESCRIPTOR_SIZE)?;
        Ok(RawDescriptor::from_le_words(words))
    }
}

/// One area of guest memory the queue reads or writes over and over (a ring, a descriptor
/// table): its guest address, and, when one region of plain physical memory holds it whole,
/// its bytes in host memory, looked up once for a run of accesses rather than on each.
///
/// An access goes through the slice when there is one, and otherwise through guest memory's
/// general accessors ([`guest`]), as it would without it: both give the same result.
struct Area<'m, M: GuestMemory + ?Sized> {
    ring: Ring,
    addr: GuestAddress,
    slice: Option<guest::Slice<'m, M>>,
}

impl<M: GuestMemory + ?Sized> Clone for Area<'_, M> {
    fn clone(&self) -> Self {
        Area {
            ring: self.ring,
            addr: self.addr,
            slice: self.slice.clone(),
        }
    }
}

impl<'m, M: GuestMemory + ?Sized> Area<'m, M> {
    /// The `len` bytes at `addr`, looked up now when `resolve`.
    fn new(mem: &'m M, ring: Ring, addr: GuestAddress, len: usize, resolve: bool) -> Self {
        let slice = if resolve {
            guest::region_slice(mem, addr, len)
        } else {
            None
        };
        Area { ring, addr, slice }
    }

    /// The guest address `off` bytes in.
    fn at(&self, off: u64) -> Result<GuestAddress> {
        self.addr.checked_add(off).ok_or(Error::RingOutsideMemory {
            ring: self.ring,
            addr: self.addr.raw_value(),
        })
    }

    /// The slice and the offset in it of the `len` bytes `off` bytes in, when it holds them.
    fn slice_at(&self, off: u64, len: usize) -> Option<(&guest::Slice<'m, M>, usize)> {
        let slice = self.slice.as_ref()?;
        let off = usize::try_from(off).ok()?;
        (off.checked_add(len)? <= slice.len()).then_some((slice, off))
    }

    /// Reads a `T` `off` bytes in.
    fn read<T: ByteValued>(&self, mem: &M, off: u64) -> Result<T> {
        if let Some(value) = self
            .slice_at(off, size_of::<T>())
            .and_then(|(slice, at)| guest::slice_load(slice, at))
        {
            return Ok(value);
        }
        Ok(guest::read_obj(mem, self.at(off)?)?)
    }

    /// Writes `value` `off` bytes in.
    fn write<T: ByteValued>(&self, mem: &M, off: u64, value: T) -> Result<()> {
        if let Some((slice, at)) = self.slice_at(off, size_of::<T>()) {
            if guest::slice_store(slice, at, value) {
                return Ok(());
            }
        }
        Ok(guest::write_obj(mem, value, self.at(off)?)?)
    }

    /// Loads a `T` `off` bytes in with `order`.
    fn load<T: AtomicAccess>(&self, mem: &M, off: u64, order: Ordering) -> Result<T> {
        if let Some(value) = self
            .slice_at(off, size_of::<T>())
            .and_then(|(slice, at)| slice.load(at, order).ok())
        {
            return Ok(value);
        }
        Ok(guest::load(mem, self.at(off)?, order)?)
    }

    /// Stores `value` `off` bytes in with `order`.
    fn store<T: AtomicAccess>(&self, mem: &M, off: u64, value: T, order: Ordering) -> Result<()> {
        if let Some((slice, at)) = self.slice_at(off, size_of::<T>()) {
            if slice.store(value, at, order).is_ok() {
                return Ok(());
            }
        }
        Ok(guest::store(mem, value, self.at(off)?, order)?)
    }
}

/// A descriptor chain taken from the available ring, with every descriptor validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    head_index: u16,
    // Inline for the few buffers most chains have (a block request has three).
    descriptors: SmallVec<[Descriptor; 4]>,
    /// How many of `descriptors` are device-readable: they come first.
    readable_count: usize,
    readable_len: u32,
    writable_len: u32,
}

impl DescriptorChain {
    /// Walks the chain that starts at `head_index` in the queue's descriptor table `desc_table`
    /// of `size` entries, reading each descriptor once and validating it. INDIRECT descriptors
    /// are accepted only with `indirect`.
    ///
    /// The chain's buffers, direct and indirect, share one budget of `size`: a longer chain, or
    /// one that loops, is an error after at most `size + 1` descriptor reads (the `+ 1` is the
    /// INDIRECT descriptor, which is not a buffer).
    fn read<'m, M: GuestMemory + ?Sized>(
        mem: &'m M,
        desc_table: &Area<'m, M>,
        size: u16,
        head_index: u16,
        indirect: bool,
    ) -> Result<Self> {
        let mut table = Table {
            area: desc_table.clone(),
            len: u32::from(size),
        };
        let mut in_indirect = false;
        let mut hint = guest::RegionHint::new();
        // The number of buffers the chain may still hold, whatever table they are in.
        let mut ttl = u32::from(size);
        let mut index = head_index;
        let mut chain = DescriptorChain {
            head_index,
            descriptors: SmallVec::new(),
            readable_count: 0,
            readable_len: 0,
            writable_len: 0,
        };

        loop {
            ttl = ttl.checked_sub(1).ok_or(Error::ChainTooLong {
                ttl: u32::from(size),
            })?;
            let desc = table.read(mem, index)?;

            if desc.has(DESC_F_INDIRECT) {
                if !indirect {
                    return Err(Error::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(Error::NestedIndirect);
                }
                if desc.has(DESC_F_NEXT) {
                    return Err(Error::IndirectWithNext);
                }
                table = Self::indirect_table(mem, &desc, size)?;
                in_indirect = true;
                // The INDIRECT descriptor is not a buffer: the table's entries take its place.
                // Given back at most once, since a second one is an error.
                ttl = ttl.saturating_add(1);
                index = 0;
                continue;
            }
            let writable = desc.has(DESC_F_WRITE);
            if !writable && chain.has_writable() {
                return Err(Error::ReadableAfterWritable);
            }
            let addr = Self::check_buffer(mem, &mut hint, &desc, writable)?;
            chain
                .readable_len
                .checked_add(chain.writable_len)
                .and_then(|total| total.checked_add(desc.len))
                .ok_or(Error::ChainLengthOverflow)?;
            // Cannot overflow: the total fits, checked just above.
            if writable {
                chain.writable_len += desc.len;
            } else {
                chain.readable_len += desc.len;
                chain.readable_count += 1;
            }
            chain.descriptors.push(Descriptor {
                addr,
                len: desc.len,
                writable,
            });

            if !desc.has(DESC_F_NEXT) {
                return Ok(chain);
            }
            index = desc.next;
        }
    }

    /// Validates the indirect table an INDIRECT descriptor points at, in a queue of `size`
    /// entries: a table holds at most `size` descriptors.
    fn indirect_table<'m, M: GuestMemory + ?Sized>(
        mem: &'m M,
        desc: &RawDescriptor,
        size: u16,
    ) -> Result<Table<'m, M>> {
        let invalid_len = Error::InvalidIndirectTableLength {
            len: desc.len,
            max: size,
        };
        let len_bytes = u64::from(desc.len);
        if len_bytes == 0 || len_bytes % DESCRIPTOR_SIZE != 0 {
            return Err(invalid_len);
        }
        let entries = match u32::try_from(len_bytes / DESCRIPTOR_SIZE) {
            Ok(entries) if entries <= u32::from(size) => entries,
            _ => return Err(invalid_len),
        };
        let outside = Error::IndirectTableOutsideMemory {
            addr: desc.addr,
            len: desc.len,
        };
        let addr = GuestAddress(desc.addr);
        let Ok(count) = usize::try_from(desc.len) else {
            return Err(outside);
        };
        if addr.checked_add(len_bytes).is_none() {
            return Err(outside);
        }
        let area = Area::new(mem, Ring::DescriptorTable, addr, count, true);
        if area.slice.is_none() && !guest::check_range(mem, addr, count, Permissions::Read) {
            return Err(outside);
        }
        Ok(Table { area, len: entries })
    }

    /// Checks that a buffer lies inside guest memory, `hint` saying where the last one was, and
    /// returns its address.
    fn check_buffer<'m, M: GuestMemory + ?Sized>(
        mem: &'m M,
        hint: &mut guest::RegionHint<'m, M>,
        desc: &RawDescriptor,
        writable: bool,
    ) -> Result<GuestAddress> {
        let addr = GuestAddress(desc.addr);
        if addr.checked_add(u64::from(desc.len)).is_none() {
            return Err(Error::BufferOverflow {
                addr: desc.addr,
                len: desc.len,
            });
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let outside = Error::BufferOutsideMemory {
            addr: desc.addr,
            len: desc.len,
        };
        let Ok(count) = usize::try_from(desc.len) else {
            return Err(outside);
        };
        // A zero-length buffer is never accessed, so only its address is checked.
        if !hint.check_range(mem, addr, count.max(1), access) {
            return Err(outside);
        }
        Ok(addr)
    }

    /// The index of the chain's first descriptor, which [`Queue::add_used`] hands back.
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// The chain's validated buffers, device-readable ones first.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// Whether a device-writable buffer was taken already.
    fn has_writable(&self) -> bool {
        self.descriptors.len() > self.readable_count
    }

    /// The device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors
            .get(..self.readable_count)
            .unwrap_or_default()
            .iter()
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors
            .get(self.readable_count..)
            .unwrap_or_default()
            .iter()
    }

    /// Total length in bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total length in bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// The bytes `[offset, offset + len)` of the device-readable part of the chain, as the
    /// pieces of its buffers that hold them, in order. A range past the end is cut short.
    pub fn readable_range(&self, offset: u32, len: u32) -> Pieces<'_> {
        self.range(false, offset, len)
    }

    /// The bytes `[offset, offset + len)` of the device-writable part of the chain, as in
    /// [`DescriptorChain::readable_range`].
    pub fn writable_range(&self, offset: u32, len: u32) -> Pieces<'_> {
        self.range(true, offset, len)
    }

    /// [`DescriptorChain::writable_range`] when `writable`, else
    /// [`DescriptorChain::readable_range`].
    fn range(&self, writable: bool, offset: u32, len: u32) -> Pieces<'_> {
        let (readable, rest) = self
            .descriptors
            .split_at_checked(self.readable_count)
            .unwrap_or((&self.descriptors, &[]));
        Pieces {
            descriptors: if writable { rest } else { readable }.iter(),
            skip: offset,
            left: len,
        }
    }

    /// Copies the device-readable part of the chain, in order, into `buf`.
    ///
    /// Copies `min(buf.len(), readable_len())` bytes and returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if guest memory cannot be read.
    pub fn read_to<M: GuestMemory + ?Sized>(&self, mem: &M, buf: &mut [u8]) -> Result<usize> {
        self.read_at(mem, 0, buf)
    }

    /// Copies the device-readable part of the chain from byte `offset` on into `buf`.
    ///
    /// Copies as many bytes as both hold and returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if guest memory cannot be read.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<usize> {
        let mut done = 0;
        for desc in self.readable_range(offset, len_u32(buf.len())) {
            let end = done + len_usize(desc.len);
            if let Some(dst) = buf.get_mut(done..end) {
                guest::read_slice(mem, dst, desc.addr)?;
                done = end;
            }
        }
        Ok(done)
    }

    /// Copies `buf` into the device-writable part of the chain, in order.
    ///
    /// Copies `min(buf.len(), writable_len())` bytes and returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if guest memory cannot be written.
    pub fn write_from<M: GuestMemory + ?Sized>(&self, mem: &M, buf: &[u8]) -> Result<usize> {
        self.write_at(mem, 0, buf)
    }

    /// Copies `buf` into the device-writable part of the chain from byte `offset` on.
    ///
    /// Copies as many bytes as both hold and returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if guest memory cannot be written.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u32,
        buf: &[u8],
    ) -> Result<usize> {
        let mut done = 0;
        for desc in self.writable_range(offset, len_u32(buf.len())) {
            let end = done + len_usize(desc.len);
            if let Some(src) = buf.get(done..end) {
                guest::write_slice(mem, src, desc.addr)?;
                done = end;
            }
        }
        Ok(done)
    }
}

/// The pieces of a chain's buffers that hold a range of its bytes, in order
/// ([`DescriptorChain::readable_range`], [`DescriptorChain::writable_range`]).
#[derive(Clone, Debug)]
pub struct Pieces<'a> {
    descriptors: std::slice::Iter<'a, Descriptor>,
    /// Bytes still to pass over before the range starts.
    skip: u32,
    /// Bytes of the range not yet handed out.
    left: u32,
}

impl Iterator for Pieces<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        while self.left > 0 {
            let desc = self.descriptors.next()?;
            if self.skip >= desc.len {
                self.skip -= desc.len;
                continue;
            }
            let start = std::mem::take(&mut self.skip);
            let count = (desc.len - start).min(self.left);
            self.left -= count;
            // Cannot fail: `start` < `desc.len`, and `addr + len` was checked to fit.
            let addr = desc.addr.checked_add(u64::from(start))?;
            return Some(Descriptor {
                addr,
                len: count,
                writable: desc.writable,
            });
        }
        None
    }
}

/// A buffer length as `u32`, saturating: chains never hold more than `u32::MAX` bytes.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A buffer length as `usize`, saturating on targets where `usize` is narrower than 32 bits.
fn len_usize(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// The device side of a split virtqueue.
///
/// The transport configures it (size, ring addresses, ready) as the driver writes the transport's
/// registers; the device then pops chains and adds used elements. Every method that touches guest
/// memory takes it as a generic [`GuestMemory`], so the queue works over any vm-memory backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    indirect_enabled: bool,
    signalled_used: Option<u16>,
}

impl Queue {
    /// Creates a queue of at most `max_size` entries, in its reset state: configured size
    /// `max_size`, not ready, rings at address 0.
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            indirect_enabled: false,
            signalled_used: None,
        }
    }

    /// Returns the queue to the state [`Queue::new`] gives it, keeping its maximum size.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// The largest size the device supports for this queue.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The size the driver configured.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Sets the size the driver chose; [`Queue::validate`] checks it.
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// Whether the driver set the queue ready.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Sets or clears the ready bit.
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// Guest physical address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }

    /// Guest physical address of the available ring.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Guest physical address of the used ring.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }

    /// Sets the descriptor table address; [`Queue::validate`] checks it.
    pub fn set_desc_table(&mut self, addr: GuestAddress) {
        self.desc_table = addr;
    }

    /// Sets the available ring address; [`Queue::validate`] checks it.
    pub fn set_avail_ring(&mut self, addr: GuestAddress) {
        self.avail_ring = addr;
    }

    /// Sets the used ring address; [`Queue::validate`] checks it.
    pub fn set_used_ring(&mut self, addr: GuestAddress) {
        self.used_ring = addr;
    }

    /// The next available ring entry the device will process.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Sets the next available ring entry to process, to restore a saved queue.
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = next_avail;
    }

    /// The next used ring entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Sets the next used ring entry to fill, to restore a saved queue.
    pub fn set_next_used(&mut self, next_used: u16) {
        self.next_used = next_used;
    }

    /// Whether VIRTIO_F_EVENT_IDX (VIRTIO_RING_F_EVENT_IDX) was negotiated for this queue.
    pub fn event_idx_enabled(&self) -> bool {
        self.event_idx_enabled
    }

    /// Records whether VIRTIO_F_EVENT_IDX was negotiated.
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx_enabled = enabled;
    }

    /// Whether VIRTIO_F_INDIRECT_DESC (VIRTIO_RING_F_INDIRECT_DESC) was negotiated, so that
    /// chains may use indirect descriptor tables. Off in a new queue.
    pub fn indirect_enabled(&self) -> bool {
        self.indirect_enabled
    }

    /// Records whether VIRTIO_F_INDIRECT_DESC was negotiated; without it an INDIRECT
    /// descriptor is an error ([`Error::IndirectNotNegotiated`]).
    pub fn set_indirect(&mut self, enabled: bool) {
        self.indirect_enabled = enabled;
    }

    /// Checks the configuration the driver wrote: a size that is a power of two no larger than
    /// the maximum, and rings aligned as the spec requires and inside guest memory, event fields
    /// included.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`], [`Error::MisalignedRing`] or [`Error::RingOutsideMemory`].
    pub fn validate<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        self.check_size()?;
        let size = u64::from(self.size);
        // flags, idx, one entry per descriptor, then the event field.
        let rings = [
            (
                Ring::DescriptorTable,
                self.desc_table,
                DESC_TABLE_ALIGN,
                size.checked_mul(DESCRIPTOR_SIZE),
            ),
            (
                Ring::AvailRing,
                self.avail_ring,
                AVAIL_RING_ALIGN,
                size.checked_mul(AVAIL_ENTRY_SIZE)
                    .and_then(|n| n.checked_add(RING_ENTRIES_OFFSET + 2)),
            ),
            (
                Ring::UsedRing,
                self.used_ring,
                USED_RING_ALIGN,
                size.checked_mul(USED_ELEMENT_SIZE)
                    .and_then(|n| n.checked_add(RING_ENTRIES_OFFSET + 2)),
            ),
        ];
        for (ring, addr, align, len) in rings {
            if addr.raw_value() % align != 0 {
                return Err(Error::MisalignedRing {
                    ring,
                    addr: addr.raw_value(),
                    align,
                });
            }
            let outside = Error::RingOutsideMemory {
                ring,
                addr: addr.raw_value(),
            };
            let Some(len) = len else {
                return Err(outside);
            };
            let Ok(count) = usize::try_from(len) else {
                return Err(outside);
            };
            let permissions = match ring {
                Ring::DescriptorTable => Permissions::Read,
                Ring::AvailRing | Ring::UsedRing => Permissions::ReadWrite,
            };
            if addr.checked_add(len).is_none() || !guest::check_range(mem, addr, count, permissions)
            {
                return Err(outside);
            }
        }
        Ok(())
    }

    fn check_size(&self) -> Result<()> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(Error::InvalidSize {
                size: self.size,
                max: self.max_size,
            });
        }
        Ok(())
    }

    /// As [`Queue::check_size`], with the answer `view` was taken with.
    fn check_size_in<M: GuestMemory + ?Sized>(&self, view: &View<'_, M>) -> Result<()> {
        if view.size_ok {
            return Ok(());
        }
        self.check_size()
    }

    /// Checks the queue can be used: ready, with a valid size (as `view` found it).
    fn check_usable_in<M: GuestMemory + ?Sized>(&self, view: &View<'_, M>) -> Result<()> {
        if !self.ready {
            return Err(Error::NotReady);
        }
        self.check_size_in(view)
    }

    /// Position in a ring of the free-running index `idx`; the size is a non-zero power of two.
    fn ring_slot(&self, idx: u16) -> u64 {
        u64::from(idx & self.size.wrapping_sub(1))
    }

    /// The offset in its ring of the event field that follows a ring's entries: `used_event`
    /// in the available ring, `avail_event` in the used ring.
    fn event_offset(&self, entry_size: u64) -> u64 {
        u64::from(self.size) * entry_size + RING_ENTRIES_OFFSET
    }

    /// The queue's areas in `mem`, each looked up once now when `resolve`, for the accesses
    /// of one call or of a batch ([`Queue::rings`]). Nothing is looked up for a queue whose
    /// size is invalid, which every access checks first.
    fn view<'m, M: GuestMemory + ?Sized>(&self, mem: &'m M, resolve: bool) -> View<'m, M> {
        let size_ok = self.check_size().is_ok();
        let resolve = resolve && size_ok;
        // Cannot overflow: the size is at most 32768. The event field ends each ring.
        let len = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
        let size = u64::from(self.size);
        let area = |ring, addr, bytes| Area::new(mem, ring, addr, len(bytes), resolve);
        View {
            mem,
            size_ok,
            desc_table: area(
                Ring::DescriptorTable,
                self.desc_table,
                size * DESCRIPTOR_SIZE,
            ),
            avail_ring: area(
                Ring::AvailRing,
                self.avail_ring,
                self.event_offset(AVAIL_ENTRY_SIZE) + 2,
            ),
            used_ring: area(
                Ring::UsedRing,
                self.used_ring,
                self.event_offset(USED_ELEMENT_SIZE) + 2,
            ),
        }
    }

    /// Takes the queue's rings in `mem` for a batch of work: they are looked up in guest
    /// memory once, here, rather than on each access, as [`Queue::pop`] and the other methods
    /// that take `mem` do. [`Rings`] has those methods.
    pub fn rings<'q, 'm, M: GuestMemory + ?Sized>(&'q mut self, mem: &'m M) -> Rings<'q, 'm, M> {
        Rings {
            view: self.view(mem, true),
            queue: self,
        }
    }

    /// Reads the driver's available index with Acquire ordering, so that the ring entries and
    /// descriptors it covers are read after it.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] or [`Error::RingOutsideMemory`] if the ring cannot be read.
    pub fn avail_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16> {
        self.avail_idx_in(&self.view(mem, false))
    }

    /// Takes the next descriptor chain the driver made available, or `None` if there is none.
    ///
    /// Once the head index has been read the entry counts as consumed, even if the chain then
    /// turns out invalid, so that one bad chain cannot wedge the queue.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] or [`Error::InvalidSize`] if the queue is not usable,
    /// [`Error::AvailIdxTooFar`] if the driver published more entries than the ring holds,
    /// [`Error::HeadIndexOutOfRange`] and the chain errors if the chain is invalid, and
    /// [`Error::GuestMemory`] if the rings cannot be read.
    pub fn pop<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<DescriptorChain>> {
        let view = self.view(mem, false);
        self.pop_in(&view)
    }

    /// Hands the chain with head `head_index` back to the driver, saying the device wrote `len`
    /// bytes into it.
    ///
    /// Writes the used element, then publishes it by storing the used index with Release
    /// ordering.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] or [`Error::InvalidSize`] if the queue is not usable,
    /// [`Error::HeadIndexOutOfRange`] if `head_index` is not in the descriptor table, and
    /// [`Error::GuestMemory`] if the used ring cannot be written.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head_index: u16,
        len: u32,
    ) -> Result<()> {
        self.add_used_batch(mem, &[(head_index, len)])
    }

    /// Hands several chains back at once, as `(head index, bytes written)` pairs in order, and
    /// publishes them with one store of the used index: the driver sees all of them or none, as
    /// a frame received over several buffers needs (VIRTIO_NET_F_MRG_RXBUF).
    ///
    /// # Errors
    ///
    /// As [`Queue::add_used`]. When a head is out of range nothing is published.
    pub fn add_used_batch<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        used: &[(u16, u32)],
    ) -> Result<()> {
        let view = self.view(mem, false);
        self.add_used_batch_in(&view, used)
    }

    /// Says whether the driver wants an interrupt for the used elements added so far.
    ///
    /// Without EVENT_IDX the driver's VIRTQ_AVAIL_F_NO_INTERRUPT flag decides. With EVENT_IDX
    /// the driver's `used_event` does, by the spec's `vring_need_event` rule over the used
    /// entries added since the last call.
    ///
    /// # Errors
    ///
    /// [`Error::NotReady`] or [`Error::InvalidSize`] if the queue is not usable, and
    /// [`Error::GuestMemory`] if the available ring cannot be read.
    pub fn needs_notification<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool> {
        let view = self.view(mem, false);
        self.needs_notification_in(&view)
    }

    /// Writes `avail_event` (after the used ring's entries): the driver need not notify the
    /// device until it makes entry `avail_event` available. Only meaningful with EVENT_IDX.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`] if the size is invalid and [`Error::GuestMemory`] if the used
    /// ring cannot be written.
    pub fn set_avail_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        avail_event: u16,
    ) -> Result<()> {
        self.set_avail_event_in(&self.view(mem, false), avail_event)
    }

    /// Asks the driver to notify the device of new available entries.
    ///
    /// With EVENT_IDX this writes `avail_event` = the next entry to process; without it, it
    /// clears VIRTQ_USED_F_NO_NOTIFY. It returns whether entries are already available, which
    /// the device must then process, since the driver may have published them before it saw
    /// the request.
    ///
    /// # Errors
    ///
    /// As [`Queue::set_avail_event`] and [`Queue::avail_idx`].
    pub fn enable_notification<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<bool> {
        self.enable_notification_in(&self.view(mem, false))
    }

    /// Tells the driver it need not notify the device, while the device is polling the queue.
    ///
    /// Without EVENT_IDX this sets VIRTQ_USED_F_NO_NOTIFY; with it this does nothing, since
    /// `avail_event` already holds back notifications until it is moved.
    ///
    /// # Errors
    ///
    /// As [`Queue::set_avail_event`].
    pub fn disable_notification<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<()> {
        self.set_notification_in(&self.view(mem, false), false)
    }

    fn avail_idx_in<M: GuestMemory + ?Sized>(&self, view: &View<'_, M>) -> Result<u16> {
        let idx = view
            .avail_ring
            .load::<u16>(view.mem, RING_IDX_OFFSET, Ordering::Relaxed)?;
        fence(Ordering::Acquire);
        Ok(u16::from_le(idx))
    }

    fn pop_in<M: GuestMemory + ?Sized>(
        &mut self,
        view: &View<'_, M>,
    ) -> Result<Option<DescriptorChain>> {
        self.check_usable_in(view)?;
        let avail_idx = self.avail_idx_in(view)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(Error::AvailIdxTooFar {
                avail_idx,
                next_avail: self.next_avail,
                size: self.size,
            });
        }
        if pending == 0 {
            return Ok(None);
        }

        // Cannot overflow: the slot is below the size, at most 32768.
        let entry = self.ring_slot(self.next_avail) * AVAIL_ENTRY_SIZE + RING_ENTRIES_OFFSET;
        let head_index = u16::from_le(view.avail_ring.read::<u16>(view.mem, entry)?);
        self.next_avail = self.next_avail.wrapping_add(1);

        if head_index >= self.size {
            return Err(Error::HeadIndexOutOfRange {
                index: head_index,
                size: self.size,
            });
        }
        DescriptorChain::read(
            view.mem,
            &view.desc_table,
            self.size,
            head_index,
            self.indirect_enabled,
        )
        .map(Some)
    }

    fn add_used_batch_in<M: GuestMemory + ?Sized>(
        &mut self,
        view: &View<'_, M>,
        used: &[(u16, u32)],
    ) -> Result<()> {
        self.check_usable_in(view)?;
        if let Some(&(index, _)) = used.iter().find(|&&(head, _)| head >= self.size) {
            return Err(Error::HeadIndexOutOfRange {
                index,
                size: self.size,
            });
        }
        let mut next_used = self.next_used;
        for &(head_index, len) in used {
            // Cannot overflow: the slot is below the size, at most 32768.
            let elem = self.ring_slot(next_used) * USED_ELEMENT_SIZE + RING_ENTRIES_OFFSET;
            let mut bytes = [0u8; 8];
            let (id, length) = bytes.split_at_mut(4);
            id.copy_from_slice(&u32::from(head_index).to_le_bytes());
            length.copy_from_slice(&len.to_le_bytes());
            view.used_ring.write(view.mem, elem, bytes)?;
            next_used = next_used.wrapping_add(1);
        }

        // The elements must be visible to the driver before the index that publishes them.
        fence(Ordering::Release);
        view.used_ring.store(
            view.mem,
            RING_IDX_OFFSET,
            next_used.to_le(),
            Ordering::Release,
        )?;
        self.next_used = next_used;
        Ok(())
    }

    fn needs_notification_in<M: GuestMemory + ?Sized>(
        &mut self,
        view: &View<'_, M>,
    ) -> Result<bool> {
        self.check_usable_in(view)?;
        // The used index the device published must be ordered before the driver's flags or
        // event index are read, else both sides can sleep waiting for each other.
        fence(Ordering::SeqCst);
        let used_idx = self.next_used;

        if !self.event_idx_enabled {
            let flags = u16::from_le(view.avail_ring.read::<u16>(view.mem, 0)?);
            return Ok(flags & AVAIL_F_NO_INTERRUPT == 0);
        }

        let used_event = view
            .avail_ring
            .read::<u16>(view.mem, self.event_offset(AVAIL_ENTRY_SIZE))?;
        let used_event = u16::from_le(used_event);
        let Some(old) = self.signalled_used.replace(used_idx) else {
            return Ok(true);
        };
        Ok(need_event(used_event, used_idx, old))
    }

    fn set_avail_event_in<M: GuestMemory + ?Sized>(
        &self,
        view: &View<'_, M>,
        avail_event: u16,
    ) -> Result<()> {
        self.check_size_in(view)?;
        let offset = self.event_offset(USED_ELEMENT_SIZE);
        view.used_ring.write(view.mem, offset, avail_event.to_le())
    }

    fn enable_notification_in<M: GuestMemory + ?Sized>(&self, view: &View<'_, M>) -> Result<bool> {
        self.set_notification_in(view, true)?;
        // The request must be visible before the available index is read again.
        fence(Ordering::SeqCst);
        Ok(self.avail_idx_in(view)? != self.next_avail)
    }

    fn set_notification_in<M: GuestMemory + ?Sized>(
        &self,
        view: &View<'_, M>,
        enable: bool,
    ) -> Result<()> {
        self.check_size_in(view)?;
        if self.event_idx_enabled {
            if enable {
                self.set_avail_event_in(view, self.next_avail)?;
            }
            return Ok(());
        }
        let flags = if enable { 0 } else { USED_F_NO_NOTIFY };
        view.used_ring.write(view.mem, 0, flags.to_le())
    }
}

/// The queue's three areas in guest memory, for the accesses of one call, or of a batch.
struct View<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    /// Whether the queue's size was valid when the view was taken: it cannot change while the
    /// view is in use, since the view is taken for one call or lives in [`Rings`], which holds
    /// the queue.
    size_ok: bool,
    desc_table: Area<'m, M>,
    avail_ring: Area<'m, M>,
    used_ring: Area<'m, M>,
}

/// A [`Queue`] with its rings looked up in guest memory once, for a batch of work: taken with
/// [`Queue::rings`], it has the queue's methods that access the rings, without their `mem`
/// argument, and each access goes straight to the ring's bytes in host memory.
///
/// A device takes it for one pass over its queue (one notification, say) and drops it before
/// guest memory can change: it borrows the memory, so the rings it resolved stay mapped. A
/// ring that no one region of plain physical memory holds whole is accessed as [`Queue`]'s
/// methods do, with the same results.
pub struct Rings<'q, 'm, M: GuestMemory + ?Sized> {
    queue: &'q mut Queue,
    view: View<'m, M>,
}

impl<M: GuestMemory + ?Sized> std::fmt::Debug for Rings<'_, '_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings").field("queue", &self.queue).finish()
    }
}

impl<'m, M: GuestMemory + ?Sized> Rings<'_, 'm, M> {
    /// The queue.
    pub fn queue(&self) -> &Queue {
        self.queue
    }

    /// The guest memory the rings are in.
    pub fn mem(&self) -> &'m M {
        self.view.mem
    }

    /// As [`Queue::set_next_avail`]: winds the queue back to an entry it took, so that the
    /// chains from there on are taken again.
    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.queue.set_next_avail(next_avail);
    }

    /// As [`Queue::avail_idx`].
    ///
    /// # Errors
    ///
    /// As [`Queue::avail_idx`].
    pub fn avail_idx(&self) -> Result<u16> {
        self.queue.avail_idx_in(&self.view)
    }

    /// As [`Queue::pop`].
    ///
    /// # Errors
    ///
    /// As [`Queue::pop`].
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>> {
        self.queue.pop_in(&self.view)
    }

    /// As [`Queue::add_used`].
    ///
    /// # Errors
    ///
    /// As [`Queue::add_used`].
    pub fn add_used(&mut self, head_index: u16, len: u32) -> Result<()> {
        self.add_used_batch(&[(head_index, len)])
    }

    /// As [`Queue::add_used_batch`].
    ///
    /// # Errors
    ///
    /// As [`Queue::add_used_batch`].
    pub fn add_used_batch(&mut self, used: &[(u16, u32)]) -> Result<()> {
        self.queue.add_used_batch_in(&self.view, used)
    }

    /// As [`Queue::needs_notification`].
    ///
    /// # Errors
    ///
    /// As [`Queue::needs_notification`].
    pub fn needs_notification(&mut self) -> Result<bool> {
        self.queue.needs_notification_in(&self.view)
    }

    /// As [`Queue::enable_notification`].
    ///
    /// # Errors
    ///
    /// As [`Queue::enable_notification`].
    pub fn enable_notification(&self) -> Result<bool> {
        self.queue.enable_notification_in(&self.view)
    }

    /// As [`Queue::disable_notification`].
    ///
    /// # Errors
    ///
    /// As [`Queue::disable_notification`].
    pub fn disable_notification(&self) -> Result<()> {
        self.queue.set_notification_in(&self.view, false)
    }

    /// As [`Queue::set_avail_event`].
    ///
    /// # Errors
    ///
    /// As [`Queue::set_avail_event`].
    pub fn set_avail_event(&self, avail_event: u16) -> Result<()> {
        self.queue.set_avail_event_in(&self.view, avail_event)
    }
}

/// The saved state of a [`Queue`]: what the transport configured and where the device is in
/// the rings, as a snapshot of a paused VM records it ([`Queue::state`]) and a new process
/// restores it ([`Queue::from_state`]).
///
/// A state read back from a file is untrusted: [`Queue::from_state`] checks it as the transport
/// checks what a driver writes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct QueueState {
    /// The largest size the device supports for this queue.
    pub max_size: u16,
    /// The size the driver configured.
    pub size: u16,
    /// Whether the driver set the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// The next available ring entry the device will process.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Whether VIRTIO_F_INDIRECT_DESC was negotiated.
    pub indirect: bool,
    /// With EVENT_IDX, the used index as of the last interrupt decision
    /// ([`Queue::needs_notification`]); `None` before the first, which then interrupts.
    pub signalled_used: Option<u16>,
}

impl Queue {
    /// The queue's state, positions included, to save.
    pub fn state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table.raw_value(),
            avail_ring: self.avail_ring.raw_value(),
            used_ring: self.used_ring.raw_value(),
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx: self.event_idx_enabled,
            indirect: self.indirect_enabled,
            signalled_used: self.signalled_used,
        }
    }

    /// The queue a saved `state` describes, after checking it as the transport checks what a
    /// driver writes: a ready queue has a size that is a power of two no larger than its
    /// maximum, and rings aligned as the spec requires. A queue that is not ready keeps
    /// whatever size and addresses the driver wrote, which [`Queue::validate`] checks when the
    /// driver sets it ready.
    ///
    /// Whether the rings lie inside guest memory is for the caller to check with
    /// [`Queue::validate`], as is whether `max_size` is the device's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`] or [`Error::MisalignedRing`] for a ready queue that breaks those
    /// rules.
    pub fn from_state(state: &QueueState) -> Result<Queue> {
        let queue = Queue {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: GuestAddress(state.desc_table),
            avail_ring: GuestAddress(state.avail_ring),
            used_ring: GuestAddress(state.used_ring),
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx,
            indirect_enabled: state.indirect,
            signalled_used: state.signalled_used,
        };
        if queue.ready {
            queue.check_size()?;
            for (ring, addr, align) in [
                (Ring::DescriptorTable, queue.desc_table, DESC_TABLE_ALIGN),
                (Ring::AvailRing, queue.avail_ring, AVAIL_RING_ALIGN),
                (Ring::UsedRing, queue.used_ring, USED_RING_ALIGN),
            ] {
                if addr.raw_value() % align != 0 {
                    return Err(Error::MisalignedRing {
                        ring,
                        addr: addr.raw_value(),
                        align,
                    });
                }
            }
        }
        Ok(queue)
    }
}

/// The spec's `vring_need_event`: whether moving the used index from `old` to `new` passed
/// `event`, in wrapping 16-bit arithmetic.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;
    use crate::mock::{
        DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MockBuffer, MockDriver, RawDescriptor,
        guest_memory,
    };

    const QUEUE_SIZE: u16 = 16;
    const MEM_SIZE: usize = 0x10000;

    /// Guest memory with a ready queue of 16 entries laid out at address 0.
    fn setup() -> (GuestMemoryMmap<()>, MockDriver, Queue) {
        let mem = guest_memory(MEM_SIZE).unwrap();
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let queue = driver.queue();
        queue.validate(&mem).unwrap();
        (mem, driver, queue)
    }

    /// An address in the data area, `n` pages in.
    fn data(driver: &MockDriver, n: u64) -> u64 {
        driver.data().raw_value().next_multiple_of(0x1000) + n * 0x1000
    }

    /// Writes `descs` at indices 0.. of the descriptor table and publishes index 0.
    fn publish_raw(mem: &GuestMemoryMmap<()>, driver: &mut MockDriver, descs: &[RawDescriptor]) {
        for (i, desc) in descs.iter().enumerate() {
            driver
                .write_descriptor(mem, u16::try_from(i).unwrap(), *desc)
                .unwrap();
        }
        driver.publish(mem, 0).unwrap();
    }

    /// Writes `descs` as an indirect table at `table`.
    fn write_table(mem: &GuestMemoryMmap<()>, table: u64, descs: &[RawDescriptor]) {
        for (i, desc) in descs.iter().enumerate() {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&desc.addr.to_le_bytes());
            bytes[8..12].copy_from_slice(&desc.len.to_le_bytes());
            bytes[12..14].copy_from_slice(&desc.flags.to_le_bytes());
            bytes[14..].copy_from_slice(&desc.next.to_le_bytes());
            let addr = GuestAddress(table + 16 * u64::try_from(i).unwrap());
            mem.write_obj(bytes, addr).unwrap();
        }
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    #[test]
    fn avail_idx_more_than_size_ahead_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        driver.set_avail_idx(&mem, QUEUE_SIZE + 1).unwrap();
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(
                err,
                Error::AvailIdxTooFar {
                    avail_idx: 17,
                    next_avail: 0,
                    size: QUEUE_SIZE
                }
            ),
            "{err:?}"
        );
        // Nothing was consumed.
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn avail_idx_exactly_size_ahead_across_the_wrap_is_accepted() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        for i in 0..QUEUE_SIZE {
            driver
                .write_descriptor(&mem, i, raw(buffer, 8, 0, 0))
                .unwrap();
        }
        queue.set_next_avail(65530);
        driver.set_avail_idx(&mem, 65530).unwrap();
        for head in 0..QUEUE_SIZE {
            driver.publish(&mem, head).unwrap();
        }
        assert_eq!(driver.avail_idx(), 65530u16.wrapping_add(QUEUE_SIZE));
        for head in 0..QUEUE_SIZE {
            assert_eq!(queue.pop(&mem).unwrap().unwrap().head_index(), head);
        }
        assert!(queue.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn head_index_out_of_range_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        driver.publish(&mem, QUEUE_SIZE).unwrap();
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(
                err,
                Error::HeadIndexOutOfRange {
                    index: QUEUE_SIZE,
                    size: QUEUE_SIZE
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn next_index_out_of_range_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        publish_raw(&mem, &mut driver, &[raw(buffer, 8, DESC_F_NEXT, 200)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NextIndexOutOfRange {
                    index: 200,
                    table_len: 16
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn descriptor_loop_ends_at_the_ttl() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        publish_raw(
            &mem,
            &mut driver,
            &[
                raw(buffer, 8, DESC_F_NEXT, 1),
                raw(buffer, 8, DESC_F_NEXT, 0),
            ],
        );
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::ChainTooLong { ttl: 16 }), "{err:?}");
    }

    #[test]
    fn descriptor_loop_in_an_indirect_table_ends_at_the_queue_size() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        let table = data(&driver, 1);
        write_table(
            &mem,
            table,
            &[
                raw(buffer, 8, DESC_F_NEXT, 1),
                raw(buffer, 8, DESC_F_NEXT, 0),
            ],
        );
        publish_raw(&mem, &mut driver, &[raw(table, 32, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::ChainTooLong { ttl: 16 }), "{err:?}");
    }

    #[test]
    fn an_indirect_table_as_long_as_the_queue_is_accepted() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        let table = data(&driver, 1);
        let entries: Vec<RawDescriptor> = (1..=QUEUE_SIZE)
            .map(|next| {
                let flags = if next < QUEUE_SIZE { DESC_F_NEXT } else { 0 };
                raw(buffer, 8, flags, next)
            })
            .collect();
        write_table(&mem, table, &entries);
        let len = u32::from(QUEUE_SIZE) * 16;
        publish_raw(&mem, &mut driver, &[raw(table, len, DESC_F_INDIRECT, 0)]);
        let chain = queue.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.descriptors().len(), usize::from(QUEUE_SIZE));
    }

    #[test]
    fn indirect_table_longer_than_the_queue_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let table = data(&driver, 1);
        let len = (u32::from(QUEUE_SIZE) + 1) * 16;
        publish_raw(&mem, &mut driver, &[raw(table, len, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::InvalidIndirectTableLength { len: l, max: QUEUE_SIZE } if l == len),
            "{err:?}"
        );
    }

    #[test]
    fn direct_and_indirect_buffers_share_one_budget_of_the_queue_size() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        let table = data(&driver, 1);
        // 8 direct buffers, then an indirect table of 9: 17 buffers in a queue of 16.
        let entries: Vec<RawDescriptor> = (1..=9)
            .map(|next| raw(buffer, 8, if next < 9 { DESC_F_NEXT } else { 0 }, next))
            .collect();
        write_table(&mem, table, &entries);
        let mut head: Vec<RawDescriptor> = (1..=8)
            .map(|next| raw(buffer, 8, DESC_F_NEXT, next))
            .collect();
        head.push(raw(table, 9 * 16, DESC_F_INDIRECT, 0));
        publish_raw(&mem, &mut driver, &head);
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::ChainTooLong { ttl: 16 }), "{err:?}");

        // One buffer fewer in the table fits exactly.
        let entries: Vec<RawDescriptor> = (1..=8)
            .map(|next| raw(buffer, 8, if next < 8 { DESC_F_NEXT } else { 0 }, next))
            .collect();
        write_table(&mem, table, &entries);
        head[8] = raw(table, 8 * 16, DESC_F_INDIRECT, 0);
        publish_raw(&mem, &mut driver, &head);
        assert_eq!(queue.pop(&mem).unwrap().unwrap().descriptors().len(), 16);
    }

    #[test]
    fn indirect_descriptor_without_the_feature_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        queue.set_indirect(false);
        let table = data(&driver, 1);
        write_table(&mem, table, &[raw(data(&driver, 0), 8, 0, 0)]);
        publish_raw(&mem, &mut driver, &[raw(table, 16, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::IndirectNotNegotiated), "{err:?}");
        assert!(!Queue::new(16).indirect_enabled());
    }

    #[test]
    fn indirect_table_of_length_zero_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let table = data(&driver, 1);
        publish_raw(&mem, &mut driver, &[raw(table, 0, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::InvalidIndirectTableLength { len: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn indirect_table_length_not_a_multiple_of_16_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let table = data(&driver, 1);
        publish_raw(&mem, &mut driver, &[raw(table, 24, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::InvalidIndirectTableLength { len: 24, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn indirect_table_of_more_than_65535_descriptors_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let len = 16 * 65536;
        publish_raw(&mem, &mut driver, &[raw(0, len, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidIndirectTableLength { len: 0x10_0000, .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn indirect_table_outside_memory_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let table = u64::try_from(MEM_SIZE).unwrap() - 16;
        publish_raw(&mem, &mut driver, &[raw(table, 32, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::IndirectTableOutsideMemory { addr, len: 32 } if addr == table),
            "{err:?}"
        );
    }

    #[test]
    fn nested_indirect_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let outer = data(&driver, 1);
        let inner = data(&driver, 2);
        write_table(&mem, inner, &[raw(data(&driver, 0), 8, 0, 0)]);
        write_table(&mem, outer, &[raw(inner, 16, DESC_F_INDIRECT, 0)]);
        publish_raw(&mem, &mut driver, &[raw(outer, 16, DESC_F_INDIRECT, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::NestedIndirect), "{err:?}");
    }

    #[test]
    fn indirect_with_next_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let table = data(&driver, 1);
        let buffer = data(&driver, 0);
        write_table(&mem, table, &[raw(buffer, 8, 0, 0)]);
        publish_raw(
            &mem,
            &mut driver,
            &[
                raw(table, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1),
                raw(buffer, 8, 0, 0),
            ],
        );
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::IndirectWithNext), "{err:?}");
    }

    #[test]
    fn buffer_beyond_guest_memory_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let addr = u64::try_from(MEM_SIZE).unwrap() - 8;
        publish_raw(&mem, &mut driver, &[raw(addr, 16, 0, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::BufferOutsideMemory { addr: a, len: 16 } if a == addr),
            "{err:?}"
        );
    }

    #[test]
    fn zero_length_buffer_outside_guest_memory_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        let addr = u64::try_from(MEM_SIZE).unwrap();
        publish_raw(&mem, &mut driver, &[raw(addr, 0, DESC_F_WRITE, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::BufferOutsideMemory { len: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn buffer_wrapping_the_address_space_is_an_error() {
        let (mem, mut driver, mut queue) = setup();
        publish_raw(&mem, &mut driver, &[raw(u64::MAX - 7, 16, 0, 0)]);
        let err = queue.pop(&mem).unwrap_err();
        assert!(
            matches!(err, Error::BufferOverflow { len: 16, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn chain_longer_than_u32_max_bytes_is_an_error() {
        // Two 2 GiB buffers over the same 2 GiB of (untouched, so uncommitted) guest memory.
        let half = 0x8000_0000u32;
        let mem = guest_memory(usize::try_from(half).unwrap()).unwrap();
        let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let mut queue = driver.queue();
        publish_raw(
            &mem,
            &mut driver,
            &[raw(0, half, DESC_F_NEXT, 1), raw(0, half, 0, 0)],
        );
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::ChainLengthOverflow), "{err:?}");
    }

    #[test]
    fn readable_after_writable_is_an_error_and_consumes_the_entry() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        publish_raw(
            &mem,
            &mut driver,
            &[
                raw(buffer, 8, DESC_F_WRITE | DESC_F_NEXT, 1),
                raw(buffer, 8, 0, 0),
            ],
        );
        let err = queue.pop(&mem).unwrap_err();
        assert!(matches!(err, Error::ReadableAfterWritable), "{err:?}");

        // The bad chain does not wedge the queue: the next one is served.
        driver
            .write_descriptor(&mem, 2, raw(buffer, 8, 0, 0))
            .unwrap();
        driver.publish(&mem, 2).unwrap();
        assert_eq!(queue.pop(&mem).unwrap().unwrap().head_index(), 2);
    }

    #[test]
    fn byte_ranges_span_buffers_and_stop_at_the_end() {
        let (mem, mut driver, mut queue) = setup();
        let (a, b, c) = (data(&driver, 0), data(&driver, 1), data(&driver, 2));
        mem.write_slice(b"0123", GuestAddress(a)).unwrap();
        mem.write_slice(b"456789", GuestAddress(b)).unwrap();
        driver
            .add_chain(
                &mem,
                &[
                    MockBuffer::readable(a, 4),
                    MockBuffer::readable(b, 6),
                    MockBuffer::writable(c, 8),
                ],
            )
            .unwrap();
        let chain = queue.pop(&mem).unwrap().unwrap();

        let pieces: Vec<_> = chain.readable_range(2, 5).collect();
        assert_eq!(
            pieces,
            [
                Descriptor {
                    addr: GuestAddress(a + 2),
                    len: 2,
                    writable: false
                },
                Descriptor {
                    addr: GuestAddress(b),
                    len: 3,
                    writable: false
                },
            ]
        );
        let mut buf = [0u8; 16];
        assert_eq!(chain.read_at(&mem, 3, &mut buf).unwrap(), 7);
        assert_eq!(&buf[..7], b"3456789");
        assert_eq!(chain.read_at(&mem, 10, &mut buf).unwrap(), 0);
        assert_eq!(chain.readable_range(u32::MAX, u32::MAX).count(), 0);

        assert_eq!(chain.write_at(&mem, 6, b"xyz").unwrap(), 2);
        let mut written = [0u8; 8];
        mem.read_slice(&mut written, GuestAddress(c)).unwrap();
        assert_eq!(&written, b"\0\0\0\0\0\0xy");
    }

    #[test]
    fn queue_not_ready_is_an_error() {
        let (mem, _driver, mut queue) = setup();
        queue.set_ready(false);
        assert!(matches!(queue.pop(&mem), Err(Error::NotReady)));
        assert!(matches!(queue.add_used(&mem, 0, 0), Err(Error::NotReady)));
        assert!(matches!(
            queue.needs_notification(&mem),
            Err(Error::NotReady)
        ));
    }

    #[test]
    fn add_used_rejects_a_head_outside_the_table() {
        let (mem, _driver, mut queue) = setup();
        let err = queue.add_used(&mem, QUEUE_SIZE, 0).unwrap_err();
        assert!(
            matches!(err, Error::HeadIndexOutOfRange { index: 16, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn validate_rejects_sizes_that_are_not_powers_of_two_up_to_the_maximum() {
        let (mem, _driver, mut queue) = setup();
        for size in [0, 12, 32] {
            queue.set_size(size);
            let err = queue.validate(&mem).unwrap_err();
            assert!(
                matches!(err, Error::InvalidSize { size: s, max: 16 } if s == size),
                "{err:?}"
            );
            queue.set_ready(true);
            assert!(matches!(queue.pop(&mem), Err(Error::InvalidSize { .. })));
        }
        queue.set_size(8);
        queue.validate(&mem).unwrap();
    }

    #[test]
    fn validate_rejects_misaligned_rings() {
        let (mem, driver, _queue) = setup();
        let cases = [
            (Ring::DescriptorTable, 16, 8),
            (Ring::AvailRing, 2, 1),
            (Ring::UsedRing, 4, 2),
        ];
        for (ring, align, shift) in cases {
            let mut queue = driver.queue();
            match ring {
                Ring::DescriptorTable => queue.set_desc_table(GuestAddress(0x1000 + shift)),
                Ring::AvailRing => queue.set_avail_ring(GuestAddress(0x1000 + shift)),
                Ring::UsedRing => queue.set_used_ring(GuestAddress(0x1000 + shift)),
            }
            let err = queue.validate(&mem).unwrap_err();
            assert!(
                matches!(err, Error::MisalignedRing { ring: r, align: a, .. } if r == ring && a == align),
                "{err:?}"
            );
        }
    }

    #[test]
    fn validate_rejects_rings_outside_guest_memory() {
        let (mem, driver, _queue) = setup();
        let end = u64::try_from(MEM_SIZE).unwrap();
        // How far before the end of memory each ring starts: less than its length (event field
        // included) and aligned, so that its last bytes fall outside memory.
        let cases = [
            (Ring::DescriptorTable, 16 * 16 - 16),
            (Ring::AvailRing, 6 + 2 * 16 - 2),
            (Ring::UsedRing, 6 + 8 * 16 - 2),
        ];
        for (ring, back) in cases {
            for addr in [end - back, u64::MAX - 15] {
                let mut queue = driver.queue();
                match ring {
                    Ring::DescriptorTable => queue.set_desc_table(GuestAddress(addr)),
                    Ring::AvailRing => queue.set_avail_ring(GuestAddress(addr)),
                    Ring::UsedRing => queue.set_used_ring(GuestAddress(addr)),
                }
                let err = queue.validate(&mem).unwrap_err();
                assert!(
                    matches!(err, Error::RingOutsideMemory { ring: r, addr: a } if r == ring && a == addr),
                    "{ring} at {addr:#x}: {err:?}"
                );
            }
            // One alignment unit lower, the ring fits.
            let mut queue = driver.queue();
            let fits = GuestAddress(
                end - back
                    - match ring {
                        Ring::DescriptorTable => 16,
                        Ring::AvailRing => 2,
                        Ring::UsedRing => 4,
                    },
            );
            match ring {
                Ring::DescriptorTable => queue.set_desc_table(fits),
                Ring::AvailRing => queue.set_avail_ring(fits),
                Ring::UsedRing => queue.set_used_ring(fits),
            }
            queue.validate(&mem).unwrap();
        }
    }

    #[test]
    fn one_descriptor_chain_round_trips() {
        let (mem, mut driver, mut queue) = setup();
        let buffer = data(&driver, 0);
        let head = driver
            .add_chain(&mem, &[MockBuffer::writable(buffer, 64)])
            .unwrap();
        let chain = queue.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        assert_eq!(
            chain.descriptors(),
            &[Descriptor {
                addr: GuestAddress(buffer),
                len: 64,
                writable: true
            }]
        );
        assert_eq!(chain.write_from(&mem, &[0xab; 100]).unwrap(), 64);
        queue.add_used(&mem, chain.head_index(), 64).unwrap();

        assert_eq!(driver.used_idx(&mem).unwrap(), 1);
        assert_eq!(driver.used_elem(&mem, 0).unwrap(), (u32::from(head), 64));
        let mut written = [0u8; 65];
        mem.read_slice(&mut written, GuestAddress(buffer)).unwrap();
        assert_eq!(&written[..64], &[0xab; 64]);
        assert_eq!(written[64], 0, "the write stayed inside the buffer");
        assert!(queue.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn three_descriptor_chain_round_trips() {
        let (mem, mut driver, mut queue) = setup();
        let (a, b, c) = (data(&driver, 0), data(&driver, 1), data(&driver, 2));
        mem.write_slice(b"head", GuestAddress(a)).unwrap();
        mem.write_slice(b"body", GuestAddress(b)).unwrap();
        let buffers = [
            MockBuffer::readable(a, 4),
            MockBuffer::readable(b, 4),
            MockBuffer::writable(c, 16),
        ];
        // A first chain moves the free descriptors along, so the second wraps the table.
        for round in 0..QUEUE_SIZE {
            let head = driver.add_chain(&mem, &buffers).unwrap();
            let chain = queue.pop(&mem).unwrap().unwrap();
            assert_eq!(chain.head_index(), head);
            assert_eq!(chain.descriptors().len(), 3);
            assert_eq!(chain.readable_len(), 8);
            assert_eq!(chain.writable_len(), 16);
            let mut request = [0u8; 8];
            assert_eq!(chain.read_to(&mem, &mut request).unwrap(), 8);
            assert_eq!(&request, b"headbody");
            assert_eq!(chain.write_from(&mem, b"ok").unwrap(), 2);
            queue.add_used(&mem, head, 2).unwrap();
            assert_eq!(driver.used_idx(&mem).unwrap(), round + 1);
            assert_eq!(driver.used_elem(&mem, round).unwrap(), (u32::from(head), 2));
        }
    }

    #[test]
    fn indirect_chain_round_trips() {
        let (mem, mut driver, mut queue) = setup();
        let (a, b, table) = (data(&driver, 0), data(&driver, 1), data(&driver, 2));
        mem.write_slice(b"request", GuestAddress(a)).unwrap();
        let head = driver
            .add_indirect_chain(
                &mem,
                GuestAddress(table),
                &[MockBuffer::readable(a, 7), MockBuffer::writable(b, 32)],
            )
            .unwrap();
        let chain = queue.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), head);
        assert_eq!(
            chain.descriptors(),
            &[
                Descriptor {
                    addr: GuestAddress(a),
                    len: 7,
                    writable: false
                },
                Descriptor {
                    addr: GuestAddress(b),
                    len: 32,
                    writable: true
                },
            ]
        );
        let mut request = [0u8; 16];
        assert_eq!(chain.read_to(&mem, &mut request).unwrap(), 7);
        assert_eq!(&request[..7], b"request");
        queue.add_used(&mem, head, 0).unwrap();
        assert_eq!(driver.used_elem(&mem, 0).unwrap(), (u32::from(head), 0));
    }

    #[test]
    fn indices_wrap_past_65535() {
        let (mem, mut driver, mut queue) = setup();
        let start = 65534u16;
        driver.set_avail_idx(&mem, start).unwrap();
        queue.set_next_avail(start);
        queue.set_next_used(start);
        let buffer = data(&driver, 0);
        let mut heads = Vec::new();
        for _ in 0..4 {
            heads.push(
                driver
                    .add_chain(&mem, &[MockBuffer::writable(buffer, 8)])
                    .unwrap(),
            );
        }
        assert_eq!(driver.avail_idx(), 2);
        for (i, head) in heads.iter().enumerate() {
            let chain = queue.pop(&mem).unwrap().unwrap();
            assert_eq!(chain.head_index(), *head);
            let len = u32::try_from(i).unwrap();
            queue.add_used(&mem, *head, len).unwrap();
        }
        assert!(queue.pop(&mem).unwrap().is_none());
        assert_eq!(queue.next_avail(), 2);
        assert_eq!(queue.next_used(), 2);
        assert_eq!(driver.used_idx(&mem).unwrap(), 2);
        for (i, head) in heads.iter().enumerate() {
            let idx = start.wrapping_add(u16::try_from(i).unwrap());
            let len = u32::try_from(i).unwrap();
            assert_eq!(
                driver.used_elem(&mem, idx).unwrap(),
                (u32::from(*head), len)
            );
        }
    }

    /// Serves three chains through [`Queue::rings`] with the queue laid out from `base` in two
    /// regions, `[0, 0x1000)` and `[0x1000, 0x10000)`, and checks what the driver sees.
    fn serve_through_rings(base: u64) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0xf000),
        ])
        .unwrap();
        let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(base));
        let mut queue = driver.queue();
        queue.set_event_idx(true);
        queue.validate(&mem).unwrap();
        let buffers = [
            MockBuffer::readable(0x4000, 16),
            MockBuffer::writable(0x5000, 512),
            MockBuffer::writable(0x6000, 1),
        ];
        for _ in 0..3 {
            driver.add_chain(&mem, &buffers).unwrap();
        }
        let mut rings = queue.rings(&mem);
        rings.disable_notification().unwrap();
        let mut heads = Vec::new();
        while let Some(chain) = rings.pop().unwrap() {
            assert_eq!(chain.readable_len(), 16);
            assert_eq!(chain.writable_len(), 513);
            heads.push(chain.head_index());
            rings.add_used(chain.head_index(), 513).unwrap();
        }
        assert_eq!(heads, [0, 3, 6]);
        assert!(rings.needs_notification().unwrap());
        assert!(!rings.enable_notification().unwrap());
        assert_eq!(rings.avail_idx().unwrap(), 3);
        assert_eq!(rings.queue().next_used(), 3);
        assert_eq!(driver.used_idx(&mem).unwrap(), 3);
        assert_eq!(driver.used_elem(&mem, 2).unwrap(), (6, 513));
        assert_eq!(driver.avail_event(&mem).unwrap(), 3);
        let rings = queue.rings(&mem);
        rings.set_avail_event(5).unwrap();
        assert_eq!(driver.avail_event(&mem).unwrap(), 5);
    }

    #[test]
    fn rings_taken_for_a_batch_serve_it_inside_one_region() {
        serve_through_rings(0x2000);
    }

    #[test]
    fn rings_that_straddle_two_regions_are_served_all_the_same() {
        // The descriptor table across the boundary, then the available ring.
        serve_through_rings(0xf80);
        serve_through_rings(0xef0);
    }

    #[test]
    fn a_batch_of_used_elements_is_published_with_one_index() {
        let (mem, driver, mut queue) = setup();
        queue
            .add_used_batch(&mem, &[(3, 10), (5, 20), (7, 30)])
            .unwrap();
        assert_eq!(driver.used_idx(&mem).unwrap(), 3);
        assert_eq!(driver.used_elem(&mem, 0).unwrap(), (3, 10));
        assert_eq!(driver.used_elem(&mem, 2).unwrap(), (7, 30));
        // A bad head anywhere publishes nothing.
        let err = queue
            .add_used_batch(&mem, &[(1, 0), (QUEUE_SIZE, 0)])
            .unwrap_err();
        assert!(
            matches!(err, Error::HeadIndexOutOfRange { index: 16, .. }),
            "{err:?}"
        );
        assert_eq!(driver.used_idx(&mem).unwrap(), 3);
        assert_eq!(queue.next_used(), 3);
    }

    #[test]
    fn notification_follows_no_interrupt_without_event_idx() {
        let (mem, driver, mut queue) = setup();
        queue.add_used(&mem, 0, 0).unwrap();
        assert!(queue.needs_notification(&mem).unwrap());
        driver.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT).unwrap();
        queue.add_used(&mem, 1, 0).unwrap();
        assert!(!queue.needs_notification(&mem).unwrap());
        driver.set_avail_flags(&mem, 0).unwrap();
        assert!(queue.needs_notification(&mem).unwrap());
    }

    #[test]
    fn notification_follows_used_event_with_event_idx() {
        let (mem, driver, mut queue) = setup();
        queue.set_event_idx(true);
        // The first check has nothing to compare with, so it notifies.
        assert!(queue.needs_notification(&mem).unwrap());
        // The driver wants an interrupt once the used entry at index 2 is filled.
        driver.set_used_event(&mem, 2).unwrap();
        // The flag is ignored with EVENT_IDX.
        driver.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT).unwrap();
        let mut notified = Vec::new();
        for head in 0..4 {
            queue.add_used(&mem, head, 0).unwrap();
            notified.push(queue.needs_notification(&mem).unwrap());
        }
        assert_eq!(notified, [false, false, true, false]);
    }

    #[test]
    fn notification_with_event_idx_wraps_past_65535() {
        let (mem, driver, mut queue) = setup();
        queue.set_event_idx(true);
        queue.set_next_used(65534);
        assert!(queue.needs_notification(&mem).unwrap());
        driver.set_used_event(&mem, 65535).unwrap();
        queue.add_used(&mem, 0, 0).unwrap();
        assert!(!queue.needs_notification(&mem).unwrap());
        // Two entries at once, 65535 and 0, cross used_event across the wrap.
        queue.add_used(&mem, 1, 0).unwrap();
        queue.add_used(&mem, 2, 0).unwrap();
        assert_eq!(queue.next_used(), 1);
        assert!(queue.needs_notification(&mem).unwrap());
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(65535, 1, 65535));
        assert!(!need_event(5, 5, 5));
    }

    #[test]
    fn enable_and_disable_notification_without_event_idx() {
        let (mem, mut driver, queue) = setup();
        queue.disable_notification(&mem).unwrap();
        assert_eq!(driver.used_flags(&mem).unwrap(), USED_F_NO_NOTIFY);
        assert!(!queue.enable_notification(&mem).unwrap());
        assert_eq!(driver.used_flags(&mem).unwrap(), 0);
        driver.publish(&mem, 0).unwrap();
        assert!(
            queue.enable_notification(&mem).unwrap(),
            "an entry is already available"
        );
    }

    #[test]
    fn enable_notification_with_event_idx_sets_avail_event() {
        let (mem, mut driver, mut queue) = setup();
        queue.set_event_idx(true);
        queue.set_next_avail(7);
        driver.set_avail_idx(&mem, 7).unwrap();
        assert!(!queue.enable_notification(&mem).unwrap());
        assert_eq!(driver.avail_event(&mem).unwrap(), 7);
        queue.set_avail_event(&mem, 9).unwrap();
        assert_eq!(driver.avail_event(&mem).unwrap(), 9);
        // Disabling leaves avail_event alone and never touches the flags.
        queue.disable_notification(&mem).unwrap();
        assert_eq!(driver.avail_event(&mem).unwrap(), 9);
        assert_eq!(driver.used_flags(&mem).unwrap(), 0);
    }

    #[test]
    fn reset_returns_the_initial_state() {
        let (mem, mut driver, mut queue) = setup();
        driver
            .add_chain(&mem, &[MockBuffer::writable(data(&driver, 0), 8)])
            .unwrap();
        queue.set_event_idx(true);
        queue.pop(&mem).unwrap().unwrap();
        queue.add_used(&mem, 0, 0).unwrap();
        queue.needs_notification(&mem).unwrap();
        queue.reset();
        assert_eq!(queue, Queue::new(QUEUE_SIZE));
        assert!(!queue.ready());
        assert_eq!(queue.next_avail(), 0);
    }

    #[test]
    fn a_saved_queue_goes_on_where_it_stopped() {
        let (mem, mut driver, mut queue) = setup();
        queue.set_event_idx(true);
        for n in 0..3 {
            driver
                .add_chain(&mem, &[MockBuffer::writable(data(&driver, n), 8)])
                .unwrap();
        }
        for _ in 0..2 {
            let chain = queue.pop(&mem).unwrap().unwrap();
            queue.add_used(&mem, chain.head_index(), 8).unwrap();
        }
        assert!(queue.needs_notification(&mem).unwrap());

        let state = queue.state();
        assert_eq!((state.next_avail, state.next_used), (2, 2));
        assert_eq!(state.signalled_used, Some(2));
        let bytes = postcard::to_stdvec(&state).unwrap();
        let state: QueueState = postcard::from_bytes(&bytes).unwrap();
        let mut restored = Queue::from_state(&state).unwrap();
        assert_eq!(restored, queue);
        restored.validate(&mem).unwrap();
        // The third chain is the next one served, into the third used entry.
        let chain = restored.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head_index(), 2);
        restored.add_used(&mem, chain.head_index(), 8).unwrap();
        assert_eq!(driver.used_idx(&mem).unwrap(), 3);
        assert_eq!(driver.used_elem(&mem, 2).unwrap(), (2, 8));
        assert!(restored.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn a_queue_in_reset_round_trips_through_its_state() {
        let queue = Queue::new(QUEUE_SIZE);
        assert_eq!(Queue::from_state(&queue.state()).unwrap(), queue);
    }

    #[test]
    fn a_ready_queue_state_with_a_bad_size_is_refused() {
        let (_mem, _driver, queue) = setup();
        for size in [0, 3, QUEUE_SIZE * 2, u16::MAX] {
            let mut state = queue.state();
            state.size = size;
            assert!(
                matches!(
                    Queue::from_state(&state),
                    Err(Error::InvalidSize { size: s, max: QUEUE_SIZE }) if s == size
                ),
                "size {size}"
            );
            // Not ready, it is only what the driver wrote so far.
            state.ready = false;
            assert_eq!(Queue::from_state(&state).unwrap().size(), size);
        }
    }

    #[test]
    fn a_ready_queue_state_with_misaligned_rings_is_refused() {
        let (_mem, _driver, queue) = setup();
        let mut state = queue.state();
        state.avail_ring += 1;
        assert!(matches!(
            Queue::from_state(&state),
            Err(Error::MisalignedRing {
                ring: Ring::AvailRing,
                ..
            })
        ));
        let mut state = queue.state();
        state.used_ring += 2;
        assert!(matches!(
            Queue::from_state(&state),
            Err(Error::MisalignedRing {
                ring: Ring::UsedRing,
                ..
            })
        ));
    }
}
