//! A split virtqueue (virtio 1.x, section 2.7), device side, hardened against a malicious guest.
//!
//! The guest driver owns three rings in guest memory: the descriptor table, the available ring
//! and the used ring. The device, through [`Queue`], takes descriptor chains that the driver made
//! available with [`Queue::pop`] and hands them back with [`Queue::add_used`].
//!
//! Everything the guest wrote is untrusted: each descriptor is read once into a local copy and
//! validated before use, every index is bounds-checked, every address and length is added with
//! checked arithmetic and checked against guest memory, chains carry a TTL so that loops end with
//! an error, and the rings are only ever accessed through vm-memory's volatile accessors.

use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

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
pub enum Error {
    /// The queue was used before the driver set it ready.
    #[error("The queue is not ready.")]
    NotReady,
    /// The configured queue size is zero, not a power of two, or above the maximum.
    #[error("The queue size {size} is not a power of two between 1 and {max}.")]
    InvalidSize {
        /// The configured size.
        size: u16,
        /// The maximum size of this queue.
        max: u16,
    },
    /// A ring's address does not have the alignment the spec requires.
    #[error("The {ring} at {addr:#x} is not aligned to {align} bytes.")]
    MisalignedRing {
        /// Which ring.
        ring: Ring,
        /// Its guest physical address.
        addr: u64,
        /// The required alignment.
        align: u64,
    },
    /// A ring does not fit in guest memory.
    #[error("The {ring} at {addr:#x} does not fit in guest memory.")]
    RingOutsideMemory {
        /// Which ring.
        ring: Ring,
        /// Its guest physical address.
        addr: u64,
    },
    /// The driver's available index is more than a queue size ahead of the device's.
    #[error(
        "The available index {avail_idx} is more than the queue size {size} ahead of the next \
         index to process, {next_avail}."
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
    #[error("The chain head index {index} is outside the descriptor table of {size} entries.")]
    HeadIndexOutOfRange {
        /// The head index read from the available ring.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` field points outside its table.
    #[error("The next descriptor index {index} is outside the table of {table_len} entries.")]
    NextIndexOutOfRange {
        /// The index read from the `next` field.
        index: u16,
        /// The number of entries in the table being walked.
        table_len: u32,
    },
    /// A chain has more descriptors than its table holds, so it loops.
    #[error("The descriptor chain is longer than its table of {ttl} entries; it loops.")]
    ChainTooLong {
        /// The largest number of descriptors the chain could hold.
        ttl: u32,
    },
    /// An indirect table's length is zero, not a multiple of 16, or above 65535 descriptors.
    #[error(
        "The indirect descriptor table length {len} is not a non-zero multiple of 16 bytes of at \
         most 65535 descriptors."
    )]
    InvalidIndirectTableLength {
        /// The length in bytes from the indirect descriptor.
        len: u32,
    },
    /// An indirect table holds another indirect descriptor.
    #[error("An indirect descriptor table holds another indirect descriptor.")]
    NestedIndirect,
    /// A descriptor has both the INDIRECT and the NEXT flag.
    #[error("A descriptor has both the INDIRECT and the NEXT flag.")]
    IndirectWithNext,
    /// An indirect table does not fit in guest memory.
    #[error("The indirect descriptor table at {addr:#x} of {len} bytes is outside guest memory.")]
    IndirectTableOutsideMemory {
        /// The table's guest physical address.
        addr: u64,
        /// The table's length in bytes.
        len: u32,
    },
    /// A buffer's end address does not fit in 64 bits.
    #[error("The buffer at {addr:#x} of {len} bytes wraps around the address space.")]
    BufferOverflow {
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length in bytes.
        len: u32,
    },
    /// A buffer does not fit in guest memory.
    #[error("The buffer at {addr:#x} of {len} bytes is outside guest memory.")]
    BufferOutsideMemory {
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length in bytes.
        len: u32,
    },
    /// The lengths of a chain's buffers add up to more than `u32::MAX`.
    #[error("The total length of the descriptor chain does not fit in 32 bits.")]
    ChainLengthOverflow,
    /// A device-readable descriptor follows a device-writable one (spec 2.7.4.2).
    #[error("A device-readable descriptor follows a device-writable one in the chain.")]
    ReadableAfterWritable,
    /// Accessing the rings or buffers in guest memory failed.
    #[error("Cannot access the virtqueue in guest memory.")]
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
    fn from_le_bytes(bytes: [u8; 16]) -> Self {
        let [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            a6,
            a7,
            l0,
            l1,
            l2,
            l3,
            f0,
            f1,
            n0,
            n1,
        ] = bytes;
        RawDescriptor {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
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
#[derive(Clone, Copy, Debug)]
struct Table {
    addr: GuestAddress,
    len: u32,
}

impl Table {
    /// Reads entry `index` once, after checking it lies inside the table.
    fn read<M: GuestMemory + ?Sized>(&self, mem: &M, index: u16) -> Result<RawDescriptor> {
        if u32::from(index) >= self.len {
            return Err(Error::NextIndexOutOfRange {
                index,
                table_len: self.len,
            });
        }
        let addr = offset(self.addr, u64::from(index), DESCRIPTOR_SIZE).ok_or(
            Error::NextIndexOutOfRange {
                index,
                table_len: self.len,
            },
        )?;
        let bytes: [u8; 16] = mem.read_obj(addr)?;
        Ok(RawDescriptor::from_le_bytes(bytes))
    }
}

/// Returns `base + index * stride`, or `None` if it does not fit in 64 bits.
fn offset(base: GuestAddress, index: u64, stride: u64) -> Option<GuestAddress> {
    index
        .checked_mul(stride)
        .and_then(|off| base.checked_add(off))
}

/// A descriptor chain taken from the available ring, with every descriptor validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    head_index: u16,
    descriptors: Vec<Descriptor>,
}

impl DescriptorChain {
    /// Walks the chain that starts at `head_index` in the descriptor table at `desc_table` of
    /// `size` entries, reading each descriptor once and validating it.
    fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        desc_table: GuestAddress,
        size: u16,
        head_index: u16,
    ) -> Result<Self> {
        let mut table = Table {
            addr: desc_table,
            len: u32::from(size),
        };
        let mut in_indirect = false;
        // The number of descriptors the chain may still hold in the table being walked.
        let mut ttl = table.len;
        let mut index = head_index;
        let mut total_len: u32 = 0;
        let mut seen_writable = false;
        let mut descriptors = Vec::new();

        loop {
            ttl = ttl
                .checked_sub(1)
                .ok_or(Error::ChainTooLong { ttl: table.len })?;
            let desc = table.read(mem, index)?;

            if desc.has(DESC_F_INDIRECT) {
                if in_indirect {
                    return Err(Error::NestedIndirect);
                }
                if desc.has(DESC_F_NEXT) {
                    return Err(Error::IndirectWithNext);
                }
                table = Self::indirect_table(mem, &desc)?;
                in_indirect = true;
                ttl = table.len;
                index = 0;
                continue;
            }

            let writable = desc.has(DESC_F_WRITE);
            if writable {
                seen_writable = true;
            } else if seen_writable {
                return Err(Error::ReadableAfterWritable);
            }
            let addr = Self::check_buffer(mem, &desc, writable)?;
            total_len = total_len
                .checked_add(desc.len)
                .ok_or(Error::ChainLengthOverflow)?;
            descriptors.push(Descriptor {
                addr,
                len: desc.len,
                writable,
            });

            if !desc.has(DESC_F_NEXT) {
                return Ok(DescriptorChain {
                    head_index,
                    descriptors,
                });
            }
            index = desc.next;
        }
    }

    /// Validates the indirect table an INDIRECT descriptor points at.
    fn indirect_table<M: GuestMemory + ?Sized>(mem: &M, desc: &RawDescriptor) -> Result<Table> {
        let invalid_len = Error::InvalidIndirectTableLength { len: desc.len };
        let len_bytes = u64::from(desc.len);
        if len_bytes == 0 || len_bytes % DESCRIPTOR_SIZE != 0 {
            return Err(invalid_len);
        }
        let entries = match u32::try_from(len_bytes / DESCRIPTOR_SIZE) {
            Ok(entries) if entries <= u32::from(u16::MAX) => entries,
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
        if addr.checked_add(len_bytes).is_none() || !mem.check_range(addr, count, Permissions::Read)
        {
            return Err(outside);
        }
        Ok(Table { addr, len: entries })
    }

    /// Checks that a buffer lies inside guest memory and returns its address.
    fn check_buffer<M: GuestMemory + ?Sized>(
        mem: &M,
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
        if !mem.check_range(addr, count.max(1), access) {
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

    /// The device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| !d.writable)
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| d.writable)
    }

    /// Total length in bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        // Cannot overflow: the sum of all lengths was checked to fit in a u32 when the chain was
        // read.
        self.readable().map(|d| d.len).sum()
    }

    /// Total length in bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        // Cannot overflow, as in `readable_len`.
        self.writable().map(|d| d.len).sum()
    }

    /// Copies the device-readable part of the chain, in order, into `buf`.
    ///
    /// Copies `min(buf.len(), readable_len())` bytes and returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if guest memory cannot be read.
    pub fn read_to<M: GuestMemory + ?Sized>(&self, mem: &M, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        for desc in self.readable() {
            let Some(rest) = buf.get_mut(done..) else {
                break;
            };
            let count = rest.len().min(len_usize(desc.len));
            if count == 0 {
                continue;
            }
            if let Some(dst) = rest.get_mut(..count) {
                mem.read_slice(dst, desc.addr)?;
                done += count;
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
        let mut done = 0;
        for desc in self.writable() {
            let Some(rest) = buf.get(done..) else {
                break;
            };
            let count = rest.len().min(len_usize(desc.len));
            if count == 0 {
                continue;
            }
            if let Some(src) = rest.get(..count) {
                mem.write_slice(src, desc.addr)?;
                done += count;
            }
        }
        Ok(done)
    }
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
            if addr.checked_add(len).is_none() || !mem.check_range(addr, count, permissions) {
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

    /// Checks the queue can be used: ready, with a valid size.
    fn check_usable(&self) -> Result<()> {
        if !self.ready {
            return Err(Error::NotReady);
        }
        self.check_size()
    }

    /// Position in a ring of the free-running index `idx`; the size is a non-zero power of two.
    fn ring_slot(&self, idx: u16) -> u64 {
        u64::from(idx & self.size.wrapping_sub(1))
    }

    /// Address of the event field that follows a ring's entries: `used_event` in the available
    /// ring, `avail_event` in the used ring.
    fn event_field(&self, kind: Ring) -> Result<GuestAddress> {
        let (ring, entry_size) = match kind {
            Ring::UsedRing => (self.used_ring, USED_ELEMENT_SIZE),
            Ring::AvailRing | Ring::DescriptorTable => (self.avail_ring, AVAIL_ENTRY_SIZE),
        };
        offset(ring, u64::from(self.size), entry_size)
            .and_then(|a| a.checked_add(RING_ENTRIES_OFFSET))
            .ok_or(Error::RingOutsideMemory {
                ring: kind,
                addr: ring.raw_value(),
            })
    }

    fn ring_field(ring: GuestAddress, kind: Ring, off: u64) -> Result<GuestAddress> {
        ring.checked_add(off).ok_or(Error::RingOutsideMemory {
            ring: kind,
            addr: ring.raw_value(),
        })
    }

    /// Reads the driver's available index with Acquire ordering, so that the ring entries and
    /// descriptors it covers are read after it.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] or [`Error::RingOutsideMemory`] if the ring cannot be read.
    pub fn avail_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16> {
        let addr = Self::ring_field(self.avail_ring, Ring::AvailRing, RING_IDX_OFFSET)?;
        let idx = u16::from_le(mem.load::<u16>(addr, Ordering::Relaxed)?);
        fence(Ordering::Acquire);
        Ok(idx)
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
        self.check_usable()?;
        let avail_idx = self.avail_idx(mem)?;
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

        let entry = offset(
            self.avail_ring,
            self.ring_slot(self.next_avail),
            AVAIL_ENTRY_SIZE,
        )
        .and_then(|a| a.checked_add(RING_ENTRIES_OFFSET))
        .ok_or(Error::RingOutsideMemory {
            ring: Ring::AvailRing,
            addr: self.avail_ring.raw_value(),
        })?;
        let head_index = u16::from_le(mem.read_obj::<u16>(entry)?);
        self.next_avail = self.next_avail.wrapping_add(1);

        if head_index >= self.size {
            return Err(Error::HeadIndexOutOfRange {
                index: head_index,
                size: self.size,
            });
        }
        DescriptorChain::read(mem, self.desc_table, self.size, head_index).map(Some)
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
        self.check_usable()?;
        if head_index >= self.size {
            return Err(Error::HeadIndexOutOfRange {
                index: head_index,
                size: self.size,
            });
        }
        let outside = Error::RingOutsideMemory {
            ring: Ring::UsedRing,
            addr: self.used_ring.raw_value(),
        };
        let elem = offset(
            self.used_ring,
            self.ring_slot(self.next_used),
            USED_ELEMENT_SIZE,
        )
        .and_then(|a| a.checked_add(RING_ENTRIES_OFFSET))
        .ok_or(outside)?;
        let mut bytes = [0u8; 8];
        let (id, length) = bytes.split_at_mut(4);
        id.copy_from_slice(&u32::from(head_index).to_le_bytes());
        length.copy_from_slice(&len.to_le_bytes());
        mem.write_obj(bytes, elem)?;

        let next_used = self.next_used.wrapping_add(1);
        let idx_addr = Self::ring_field(self.used_ring, Ring::UsedRing, RING_IDX_OFFSET)?;
        // The element must be visible to the driver before the index that publishes it.
        fence(Ordering::Release);
        mem.store(next_used.to_le(), idx_addr, Ordering::Release)?;
        self.next_used = next_used;
        Ok(())
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
        self.check_usable()?;
        // The used index the device published must be ordered before the driver's flags or
        // event index are read, else both sides can sleep waiting for each other.
        fence(Ordering::SeqCst);
        let used_idx = self.next_used;

        if !self.event_idx_enabled {
            let flags: u16 = u16::from_le(mem.read_obj(self.avail_ring)?);
            return Ok(flags & AVAIL_F_NO_INTERRUPT == 0);
        }

        let used_event_addr = self.event_field(Ring::AvailRing)?;
        let used_event = u16::from_le(mem.read_obj::<u16>(used_event_addr)?);
        let Some(old) = self.signalled_used.replace(used_idx) else {
            return Ok(true);
        };
        Ok(need_event(used_event, used_idx, old))
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
        self.check_size()?;
        let addr = self.event_field(Ring::UsedRing)?;
        mem.write_obj(avail_event.to_le(), addr)?;
        Ok(())
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
        self.set_notification(mem, true)?;
        // The request must be visible before the available index is read again.
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != self.next_avail)
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
        self.set_notification(mem, false)
    }

    fn set_notification<M: GuestMemory + ?Sized>(&self, mem: &M, enable: bool) -> Result<()> {
        self.check_size()?;
        if self.event_idx_enabled {
            if enable {
                self.set_avail_event(mem, self.next_avail)?;
            }
            return Ok(());
        }
        let flags = if enable { 0 } else { USED_F_NO_NOTIFY };
        mem.write_obj(flags.to_le(), self.used_ring)?;
        Ok(())
    }
}

/// The spec's `vring_need_event`: whether moving the used index from `old` to `new` passed
/// `event`, in wrapping 16-bit arithmetic.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
