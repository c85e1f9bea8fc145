//! Guest memory accesses on the hot paths of the queue and the devices.
//!
//! vm-memory's [`Bytes`] methods on a [`GuestMemory`] go through its general slice iterator,
//! which costs several times what the access itself does. Where guest memory is plain physical
//! memory (no IOMMU), these functions reach the one region that holds the bytes directly and use
//! its volatile slice, which checks the bounds and keeps dirty tracking just the same; they fall
//! back on the [`Bytes`] methods for everything else (an IOMMU, bytes that span regions, an
//! address outside memory), so their results never differ from those of [`Bytes`].

use std::sync::atomic::Ordering;

use vm_memory::bitmap::{BS, Bitmap, BitmapSlice};
use vm_memory::{
    Address, AtomicAccess, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend,
    GuestMemoryError, GuestMemoryRegion, Permissions, VolatileMemory, VolatileSlice,
};

type Result<T> = std::result::Result<T, GuestMemoryError>;

/// A region of `M`'s physical memory.
type Region<M> = <<M as GuestMemory>::PhysicalMemory as GuestMemoryBackend>::R;

/// The dirty bitmap of a region of `M`'s physical memory.
type RegionBitmap<M> = <Region<M> as GuestMemoryRegion>::B;

/// Bytes of one region of `M`'s physical memory, with their dirty bitmap.
pub(crate) type Slice<'a, M> = VolatileSlice<'a, BS<'a, RegionBitmap<M>>>;

/// The volatile slice of the `len` bytes at `addr`, when one region of plain physical memory
/// holds them all.
pub(crate) fn region_slice<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<Slice<'_, M>> {
    let region = mem.physical_memory()?.find_region(addr)?;
    let offset = region.to_region_addr(addr)?;
    region.get_slice(offset, len).ok()
}

/// Reads the `T` at `offset` in `slice` with one volatile load, or `None` when it does not fit.
/// ([`Bytes::read_obj`] on a slice copies through a loop that handles any length and alignment,
/// which costs several times as much for the few bytes of a ring entry or a descriptor.)
pub(crate) fn slice_load<T: ByteValued, B: BitmapSlice>(
    slice: &VolatileSlice<'_, B>,
    offset: usize,
) -> Option<T> {
    slice.get_ref::<T>(offset).ok().map(|value| value.load())
}

/// Writes `value` at `offset` in `slice` with one volatile store, marking it dirty, and returns
/// whether it fits, as [`slice_load`] reads.
pub(crate) fn slice_store<T: ByteValued, B: BitmapSlice>(
    slice: &VolatileSlice<'_, B>,
    offset: usize,
    value: T,
) -> bool {
    slice
        .get_ref::<T>(offset)
        .map(|place| place.store(value))
        .is_ok()
}

/// Whether the `len` bytes at `addr` are all guest memory accessible for `access`, as
/// [`GuestMemory::check_range`].
pub fn check_range<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
) -> bool {
    region_slice(mem, addr, len).is_some() || mem.check_range(addr, len, access)
}

/// The region of plain physical memory that held the last range [`RegionHint::check_range`]
/// found, so that a run of checks in one region (a chain's buffers, as drivers place them) looks
/// it up once. It borrows guest memory, so the region cannot go away while it is kept.
pub(crate) struct RegionHint<'m, M: GuestMemory + ?Sized> {
    region: Option<&'m Region<M>>,
}

impl<'m, M: GuestMemory + ?Sized> RegionHint<'m, M> {
    /// A hint that holds no region yet.
    pub(crate) fn new() -> Self {
        RegionHint { region: None }
    }

    /// As [`check_range`]: the remembered region answers when it holds the whole range,
    /// otherwise the region of `addr` is looked up and remembered.
    pub(crate) fn check_range(
        &mut self,
        mem: &'m M,
        addr: GuestAddress,
        len: usize,
        access: Permissions,
    ) -> bool {
        if self.region.is_some_and(|region| holds(region, addr, len)) {
            return true;
        }
        let found = mem
            .physical_memory()
            .and_then(|memory| memory.find_region(addr))
            .filter(|region| holds(*region, addr, len));
        match found {
            Some(region) => {
                self.region = Some(region);
                true
            }
            None => mem.check_range(addr, len, access),
        }
    }
}

/// Whether `region` holds all `len` bytes at `addr`.
fn holds<R: GuestMemoryRegion>(region: &R, addr: GuestAddress, len: usize) -> bool {
    let Some(offset) = addr.checked_offset_from(region.start_addr()) else {
        return false;
    };
    u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .is_some_and(|end| end <= region.len())
}

/// Marks the `len` bytes at `addr` dirty, after the host wrote them through a raw host address
/// (which bypasses vm-memory's dirty tracking).
pub fn mark_dirty<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: usize) {
    if let Some(slice) = region_slice(mem, addr, len) {
        slice.bitmap().mark_dirty(0, len);
        return;
    }
    if let Ok(slices) = mem.get_slices(addr, len, Permissions::Write) {
        for slice in slices.flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Reads a `T` at `addr`, as [`Bytes::read_obj`].
///
/// # Errors
///
/// When the bytes are not all in guest memory.
pub fn read_obj<T: ByteValued, M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress) -> Result<T> {
    match region_slice(mem, addr, size_of::<T>()).and_then(|s| slice_load(&s, 0)) {
        Some(value) => Ok(value),
        None => mem.read_obj(addr),
    }
}

/// Writes `value` at `addr`, as [`Bytes::write_obj`].
///
/// # Errors
///
/// When the bytes are not all in guest memory.
pub fn write_obj<T: ByteValued, M: GuestMemory + ?Sized>(
    mem: &M,
    value: T,
    addr: GuestAddress,
) -> Result<()> {
    match region_slice(mem, addr, size_of::<T>()) {
        Some(slice) if slice_store(&slice, 0, value) => Ok(()),
        _ => mem.write_obj(value, addr),
    }
}

/// Loads a `T` at `addr` atomically with `order`, as [`Bytes::load`].
///
/// # Errors
///
/// When the bytes are not in guest memory or not aligned for `T`.
pub fn load<T: AtomicAccess, M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    order: Ordering,
) -> Result<T> {
    match region_slice(mem, addr, size_of::<T>()).and_then(|s| s.load(0, order).ok()) {
        Some(value) => Ok(value),
        None => mem.load(addr, order),
    }
}

/// Stores `value` at `addr` atomically with `order`, as [`Bytes::store`].
///
/// # Errors
///
/// When the bytes are not in guest memory or not aligned for `T`.
pub fn store<T: AtomicAccess, M: GuestMemory + ?Sized>(
    mem: &M,
    value: T,
    addr: GuestAddress,
    order: Ordering,
) -> Result<()> {
    match region_slice(mem, addr, size_of::<T>()) {
        Some(slice) if slice.store(value, 0, order).is_ok() => Ok(()),
        _ => mem.store(value, addr, order),
    }
}

/// Copies the bytes at `addr` into `buf`, as [`Bytes::read_slice`].
///
/// # Errors
///
/// When the bytes are not all in guest memory.
pub fn read_slice<M: GuestMemory + ?Sized>(
    mem: &M,
    buf: &mut [u8],
    addr: GuestAddress,
) -> Result<()> {
    match region_slice(mem, addr, buf.len()) {
        Some(slice) if slice.read_slice(buf, 0).is_ok() => Ok(()),
        _ => mem.read_slice(buf, addr),
    }
}

/// Copies `buf` into guest memory at `addr`, as [`Bytes::write_slice`].
///
/// # Errors
///
/// When the bytes are not all in guest memory.
pub fn write_slice<M: GuestMemory + ?Sized>(mem: &M, buf: &[u8], addr: GuestAddress) -> Result<()> {
    match region_slice(mem, addr, buf.len()) {
        Some(slice) if slice.write_slice(buf, 0).is_ok() => Ok(()),
        _ => mem.write_slice(buf, addr),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn two_regions() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn accesses_inside_one_region_read_back_what_was_written() {
        let mem = two_regions();
        write_obj(&mem, 0x1234_5678u32, GuestAddress(0x100)).unwrap();
        assert_eq!(
            read_obj::<u32, _>(&mem, GuestAddress(0x100)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x100)).unwrap(),
            0x1234_5678
        );
        store(&mem, 7u16, GuestAddress(0x1002), Ordering::Release).unwrap();
        assert_eq!(
            load::<u16, _>(&mem, GuestAddress(0x1002), Ordering::Acquire).unwrap(),
            7
        );
    }

    #[test]
    fn words_load_and_store_at_any_alignment() {
        let mem = two_regions();
        let bytes: Vec<u8> = (1..=16).collect();
        mem.write_slice(&bytes, GuestAddress(0x103)).unwrap();
        let [low, high] = read_obj::<[u64; 2], _>(&mem, GuestAddress(0x103)).unwrap();
        assert_eq!(low.to_ne_bytes(), bytes[..8]);
        assert_eq!(high.to_ne_bytes(), bytes[8..]);
        write_obj(&mem, 0xabu8, GuestAddress(0x1ff)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1ff)).unwrap(), 0xab);
    }

    #[test]
    fn a_region_hint_answers_as_guest_memory_does() {
        let mem = two_regions();
        let mut hint = RegionHint::new();
        let ranges = [
            (0x0, 0x1000),
            (0x10, 0x10),
            (0x1000, 0x1000),
            (0x800, 0x10),
            (0xff8, 0x10),
            (0x1ff0, 0x11),
            (0x2000, 1),
            (0x1fff, 1),
            (u64::MAX, 1),
            (0x10, usize::MAX as u64),
        ];
        for (addr, len) in ranges {
            let (addr, len) = (GuestAddress(addr), usize::try_from(len).unwrap());
            assert_eq!(
                hint.check_range(&mem, addr, len, Permissions::Read),
                GuestMemory::check_range(&mem, addr, len, Permissions::Read),
                "{addr:?} + {len:#x}"
            );
        }
    }

    #[test]
    fn accesses_across_regions_fall_back_and_still_work() {
        let mem = two_regions();
        write_slice(&mem, b"straddle", GuestAddress(0xffc)).unwrap();
        let mut buf = [0u8; 8];
        read_slice(&mem, &mut buf, GuestAddress(0xffc)).unwrap();
        assert_eq!(&buf, b"straddle");
        assert_eq!(
            read_obj::<u64, _>(&mem, GuestAddress(0xffc)).unwrap(),
            u64::from_le_bytes(*b"straddle")
        );
    }

    #[test]
    fn accesses_outside_memory_and_misaligned_atomics_are_errors() {
        let mem = two_regions();
        assert!(read_obj::<u32, _>(&mem, GuestAddress(0x1ffe)).is_err());
        assert!(write_obj(&mem, 0u64, GuestAddress(0x2000)).is_err());
        assert!(load::<u16, _>(&mem, GuestAddress(0x101), Ordering::Acquire).is_err());
        assert!(store(&mem, 0u16, GuestAddress(u64::MAX), Ordering::Release).is_err());
        let mut buf = [0u8; 2];
        assert!(read_slice(&mem, &mut buf, GuestAddress(0x1fff)).is_err());
    }
}
