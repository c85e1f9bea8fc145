//! A mock guest driver for tests, fuzz targets and benches (feature `test-utils`).
//!
//! [`MockDriver`] lays a split virtqueue's rings out in real guest memory, the way a guest
//! driver would, builds descriptor chains (direct or indirect), publishes them in the available
//! ring and reads back what the device put in the used ring. It also writes raw, invalid
//! descriptors and indices, to drive the device side into its error paths.

use std::fs::File;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::queue::{DESCRIPTOR_SIZE, Queue, USED_ELEMENT_SIZE};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Result of the mock driver's guest memory accesses.
pub type Result<T> = std::result::Result<T, GuestMemoryError>;

/// Guest memory of `len` bytes at guest address 0, in one region.
///
/// # Errors
///
/// If the memory cannot be mapped.
pub fn guest_memory(
    len: usize,
) -> std::result::Result<GuestMemoryMmap<()>, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
}

/// A descriptor as the driver writes it into a descriptor table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor, when `flags` has [`DESC_F_NEXT`].
    pub next: u16,
}

impl RawDescriptor {
    fn to_le_bytes(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        let (addr, rest) = bytes.split_at_mut(8);
        let (len, rest) = rest.split_at_mut(4);
        let (flags, next) = rest.split_at_mut(2);
        addr.copy_from_slice(&self.addr.to_le_bytes());
        len.copy_from_slice(&self.len.to_le_bytes());
        flags.copy_from_slice(&self.flags.to_le_bytes());
        next.copy_from_slice(&self.next.to_le_bytes());
        bytes
    }
}

/// One buffer of a chain the mock driver builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MockBuffer {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

impl MockBuffer {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        MockBuffer {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        MockBuffer {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }
}

/// The driver side of one split virtqueue, laid out in guest memory.
#[derive(Clone, Debug)]
pub struct MockDriver {
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    data: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl MockDriver {
    /// Lays out a queue of `size` entries from `base` (which must be 16-byte aligned): the
    /// descriptor table, then the available ring, then the used ring, each aligned as the spec
    /// requires and with its event field. [`MockDriver::data`] is the first address after them.
    pub fn new(size: u16, base: GuestAddress) -> Self {
        let size64 = u64::from(size);
        let desc_table = base;
        let avail_ring = desc_table.unchecked_add(size64 * DESCRIPTOR_SIZE);
        let avail_end = avail_ring.unchecked_add(6 + 2 * size64);
        let used_ring = GuestAddress(avail_end.raw_value().next_multiple_of(4));
        let used_end = used_ring.unchecked_add(6 + size64 * USED_ELEMENT_SIZE);
        let data = GuestAddress(used_end.raw_value().next_multiple_of(16));
        MockDriver {
            size,
            desc_table,
            avail_ring,
            used_ring,
            data,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A queue configured with this layout, ready, of maximum size `size`, with
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated (see [`Queue::set_indirect`]).
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size);
        queue.set_desc_table(self.desc_table);
        queue.set_avail_ring(self.avail_ring);
        queue.set_used_ring(self.used_ring);
        queue.set_indirect(true);
        queue.set_ready(true);
        queue
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
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

    /// The first address after the rings, free for buffers and indirect tables.
    pub fn data(&self) -> GuestAddress {
        self.data
    }

    /// Writes descriptor `index` of the descriptor table as given.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn write_descriptor<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
        index: u16,
        desc: RawDescriptor,
    ) -> Result<()> {
        let addr = self
            .desc_table
            .unchecked_add(u64::from(index) * DESCRIPTOR_SIZE);
        mem.write_obj(desc.to_le_bytes(), addr)
    }

    /// Builds a chain of `buffers` in the next free descriptors (wrapping around the table),
    /// publishes it and returns its head index.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn add_chain<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &mut self,
        mem: &M,
        buffers: &[MockBuffer],
    ) -> Result<u16> {
        let head = self.next_desc;
        for (i, buffer) in buffers.iter().enumerate() {
            let index = self.next_desc;
            let next = index.wrapping_add(1) % self.size;
            let mut flags = if buffer.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            let desc = RawDescriptor {
                addr: buffer.addr.raw_value(),
                len: buffer.len,
                flags,
                next: if flags & DESC_F_NEXT != 0 { next } else { 0 },
            };
            self.write_descriptor(mem, index, desc)?;
            self.next_desc = next;
        }
        self.publish(mem, head)?;
        Ok(head)
    }

    /// Writes `buffers` as an indirect table at `table`, points the next free descriptor at it,
    /// publishes that descriptor and returns its index.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn add_indirect_chain<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &mut self,
        mem: &M,
        table: GuestAddress,
        buffers: &[MockBuffer],
    ) -> Result<u16> {
        let count = u16::try_from(buffers.len()).unwrap_or(u16::MAX);
        for (i, buffer) in buffers.iter().take(usize::from(count)).enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let mut flags = if buffer.writable { DESC_F_WRITE } else { 0 };
            let last = usize::from(index) + 1 == buffers.len();
            if !last {
                flags |= DESC_F_NEXT;
            }
            let desc = RawDescriptor {
                addr: buffer.addr.raw_value(),
                len: buffer.len,
                flags,
                next: if last { 0 } else { index + 1 },
            };
            mem.write_obj(
                desc.to_le_bytes(),
                table.unchecked_add(u64::from(index) * DESCRIPTOR_SIZE),
            )?;
        }
        let head = self.next_desc;
        self.write_descriptor(
            mem,
            head,
            RawDescriptor {
                addr: table.raw_value(),
                len: u32::from(count) * 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        self.next_desc = head.wrapping_add(1) % self.size;
        self.publish(mem, head)?;
        Ok(head)
    }

    /// Puts `head` in the next available ring entry and then moves the available index past
    /// it, as a driver does.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn publish<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &mut self,
        mem: &M,
        head: u16,
    ) -> Result<()> {
        self.set_avail_entry(mem, self.avail_idx, head)?;
        fence(Ordering::Release);
        self.set_avail_idx(mem, self.avail_idx.wrapping_add(1))
    }

    /// Makes the whole ring available again: moves the available index to the used index plus
    /// the queue size, so that every entry the device handed back is offered again with the
    /// head it held. A driver thread that calls it in a loop keeps the ring full for ever.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be read or written.
    pub fn refill<M: Bytes<GuestAddress, E = GuestMemoryError>>(&mut self, mem: &M) -> Result<()> {
        let used = self.used_idx(mem)?;
        self.set_avail_idx(mem, used.wrapping_add(self.size))
    }

    /// Writes `head` into the available ring entry for free-running index `idx`.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn set_avail_entry<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
        idx: u16,
        head: u16,
    ) -> Result<()> {
        let slot = u64::from(idx % self.size);
        mem.write_obj(head.to_le(), self.avail_ring.unchecked_add(4 + 2 * slot))
    }

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes the available index, as is.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn set_avail_idx<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<()> {
        self.avail_idx = idx;
        mem.store(
            idx.to_le(),
            self.avail_ring.unchecked_add(2),
            Ordering::Release,
        )
    }

    /// Writes the available ring's flags (`VRING_AVAIL_F_NO_INTERRUPT`).
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn set_avail_flags<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
        flags: u16,
    ) -> Result<()> {
        mem.write_obj(flags.to_le(), self.avail_ring)
    }

    /// Writes `used_event`, after the available ring's entries.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be written.
    pub fn set_used_event<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
        used_event: u16,
    ) -> Result<()> {
        let addr = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
        mem.write_obj(used_event.to_le(), addr)
    }

    /// Reads the used ring's flags (`VRING_USED_F_NO_NOTIFY`).
    ///
    /// # Errors
    ///
    /// If guest memory cannot be read.
    pub fn used_flags<M: Bytes<GuestAddress, E = GuestMemoryError>>(&self, mem: &M) -> Result<u16> {
        mem.read_obj::<u16>(self.used_ring).map(u16::from_le)
    }

    /// Reads the used index.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be read.
    pub fn used_idx<M: Bytes<GuestAddress, E = GuestMemoryError>>(&self, mem: &M) -> Result<u16> {
        let idx = mem.load::<u16>(self.used_ring.unchecked_add(2), Ordering::Acquire)?;
        Ok(u16::from_le(idx))
    }

    /// Reads the used element for free-running index `idx` as `(id, len)`.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be read.
    pub fn used_elem<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
        idx: u16,
    ) -> Result<(u32, u32)> {
        let slot = u64::from(idx % self.size);
        let addr = self.used_ring.unchecked_add(4 + USED_ELEMENT_SIZE * slot);
        let id = mem.read_obj::<u32>(addr)?;
        let len = mem.read_obj::<u32>(addr.unchecked_add(4))?;
        Ok((u32::from_le(id), u32::from_le(len)))
    }

    /// Reads `avail_event`, after the used ring's elements.
    ///
    /// # Errors
    ///
    /// If guest memory cannot be read.
    pub fn avail_event<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
    ) -> Result<u16> {
        let addr = self
            .used_ring
            .unchecked_add(4 + USED_ELEMENT_SIZE * u64::from(self.size));
        mem.read_obj::<u16>(addr).map(u16::from_le)
    }
}

/// An empty file, open for reading and writing and already unlinked: a scratch disk image.
///
/// # Errors
///
/// When the temporary directory cannot hold it.
pub fn scratch_file() -> std::io::Result<File> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ember-scratch-{}-{n}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}
