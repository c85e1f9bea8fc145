//! Port I/O and MMIO buses for virtual machine monitors.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. A vCPU that exits on an I/O port or MMIO
//! access hands the address and the data buffer to the bus, which finds the device whose range holds
//! the access and calls it with the range's base and the offset into it. Accesses that straddle the
//! end of a range, have a length other than 1, 2, 4 or 8 bytes, or hit no device are reported as
//! errors, never forwarded.
//!
//! Devices implement [`BusDevice`] (shared, `&self`) or [`BusDeviceMut`] (exclusive, `&mut self`);
//! a `Mutex<T: BusDeviceMut>` and an `Arc<T: BusDevice>` are themselves [`BusDevice`]s, so a device
//! with interior state is inserted as `Arc<Mutex<T>>`.
//!
//! # Two address spaces, two types
//!
//! A bus is typed by the address space it serves: a [`PioBus`] (`Bus<Pio>`) holds the 64 Ki x86
//! I/O ports, `0..=0xffff`, and refuses a range that runs past them; an [`MmioBus`]
//! (`Bus<Mmio>`) holds the whole 64-bit physical address space. The two are distinct types, so
//! handing the MMIO bus to code that registers port devices is a compile-time error:
//!
//! ```compile_fail,E0308
//! use ember_bus::{MmioBus, PioBus};
//!
//! fn attach_port_devices(_pio: &mut PioBus) {}
//!
//! let mut mmio = MmioBus::new();
//! attach_port_devices(&mut mmio); // error: expected `Bus<Pio>`, found `Bus<Mmio>`
//! ```
//!
//! Addresses are `u64` on both buses, so that devices implement one trait whichever bus they sit
//! on; the device sees its range's base and the offset into it.
//!
//! The crate knows nothing of KVM or of guest memory.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_bus::{BusDeviceMut, BusRange, PioBus};
//!
//! /// A scratch register that remembers the last byte written to it.
//! #[derive(Default)]
//! struct Scratch(u8);
//!
//! impl BusDeviceMut for Scratch {
//!     fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
//!         data.fill(self.0);
//!     }
//!     fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
//!         self.0 = data[0];
//!     }
//! }
//!
//! let mut bus = PioBus::new();
//! bus.insert(BusRange::new(0x3f8, 8)?, Arc::new(Mutex::new(Scratch::default())))?;
//! bus.write(0x3ff, &[0x42])?;
//! let mut data = [0u8; 1];
//! bus.read(0x3ff, &mut data)?;
//! assert_eq!(data, [0x42]);
//! // Nothing lives at 0x400.
//! assert!(bus.read(0x400, &mut data).is_err());
//! // Ports end at 0xffff.
//! assert!(bus.insert(BusRange::new(0xfffc, 8)?, Arc::new(Mutex::new(Scratch::default()))).is_err());
//! # Ok::<(), ember_bus::Error>(())
//! ```
#![deny(missing_docs)]

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Errors of bus configuration and dispatch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A range of zero length was requested.
    #[error("A bus range cannot be empty")]
    EmptyRange,
    /// The range would extend past the end of the address space.
    #[error("The bus range at {base:#x} of length {len:#x} overflows the address space")]
    RangeOverflow {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range runs past the last address of the bus's address space (port 0xffff on a
    /// [`PioBus`]).
    #[error("The bus range {range} runs past the last {space} address {last:#x}")]
    OutsideAddressSpace {
        /// The rejected range.
        range: BusRange,
        /// The address space's name.
        space: &'static str,
        /// The last address of the address space.
        last: u64,
    },
    /// The range overlaps one that is already on the bus.
    #[error("The bus range {new} overlaps the registered range {existing}")]
    Overlap {
        /// The rejected range.
        new: BusRange,
        /// The range already on the bus.
        existing: BusRange,
    },
    /// No device is registered at the accessed address.
    #[error("No device at address {0:#x}")]
    NoDevice(u64),
    /// The access length is not 1, 2, 4 or 8 bytes.
    #[error("Invalid bus access length {0}")]
    InvalidAccessLength(usize),
    /// The access starts inside a device's range but ends past it.
    #[error("Access of {len} bytes at {addr:#x} crosses the end of the device range {range}")]
    AccessOutOfRange {
        /// Accessed address.
        addr: u64,
        /// Access length in bytes.
        len: usize,
        /// The device range the access started in.
        range: BusRange,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A non-empty, non-wrapping range of bus addresses: `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// Creates the range `[base, base + len)`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`] when `len` is 0, [`Error::RangeOverflow`] when the range would run
    /// past `u64::MAX`.
    pub fn new(base: u64, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::EmptyRange);
        }
        // The last address, base + len - 1, must be representable.
        base.checked_add(len - 1)
            .ok_or(Error::RangeOverflow { base, len })?;
        Ok(BusRange { base, len })
    }

    /// First address of the range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a `BusRange` is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address inside the range.
    pub fn last(&self) -> u64 {
        // Cannot overflow: checked in `new`, and len >= 1.
        self.base + (self.len - 1)
    }

    /// Whether `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last()
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.base, self.last())
    }
}

// Ranges on a bus never overlap, so ordering them by base address alone is a total order over the
// ranges a `Bus` holds.
impl PartialOrd for BusRange {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BusRange {
    fn cmp(&self, other: &Self) -> Ordering {
        self.base
            .cmp(&other.base)
            .then_with(|| self.len.cmp(&other.len))
    }
}

/// A device that handles bus accesses through a shared reference.
///
/// `base` is the start of the range the device was registered at and `offset` the distance of the
/// access from it; `data.len()` is 1, 2, 4 or 8 and `offset + data.len()` stays inside the range.
pub trait BusDevice: Send + Sync {
    /// Handles a read: fills `data`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

/// A device that handles bus accesses through an exclusive reference; see [`BusDevice`] for the
/// meaning of the arguments. Wrap it in a [`Mutex`] to put it on a bus.
pub trait BusDeviceMut: Send {
    /// Handles a read: fills `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

impl<T: BusDeviceMut> BusDevice for Mutex<T> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        // A device that panicked while holding the lock left no invariant we could restore; keep
        // serving accesses with its state as it is rather than propagating the panic to the vCPU.
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(base, offset, data)
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(base, offset, data)
    }
}

impl<T: BusDevice + ?Sized> BusDevice for Arc<T> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        (**self).read(base, offset, data)
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        (**self).write(base, offset, data)
    }
}

mod private {
    /// Keeps [`AddressSpace`](super::AddressSpace) implemented only by this crate's markers.
    pub trait Sealed {}
}

/// The address space a [`Bus`] serves: [`Pio`] or [`Mmio`]. Sealed: a bus is one of the two.
pub trait AddressSpace: private::Sealed + Send + Sync + 'static {
    /// The space's name, for messages.
    const NAME: &'static str;
    /// The last address of the space.
    const LAST: u64;
}

/// The x86 I/O port space: ports `0..=0xffff`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pio;

/// The memory-mapped I/O space: the 64-bit guest physical address space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mmio;

impl private::Sealed for Pio {}
impl private::Sealed for Mmio {}

impl AddressSpace for Pio {
    const NAME: &'static str = "port";
    const LAST: u64 = 0xffff;
}

impl AddressSpace for Mmio {
    const NAME: &'static str = "MMIO";
    const LAST: u64 = u64::MAX;
}

/// A map of non-overlapping address ranges of the address space `S` to devices.
pub struct Bus<S: AddressSpace> {
    devices: BTreeMap<BusRange, Arc<dyn BusDevice>>,
    space: PhantomData<S>,
}

/// A bus of I/O ports (x86 `in`/`out`): ranges end at port 0xffff; addresses are widened to
/// `u64`.
pub type PioBus = Bus<Pio>;
/// A bus of memory-mapped I/O addresses.
pub type MmioBus = Bus<Mmio>;

impl<S: AddressSpace> Default for Bus<S> {
    fn default() -> Self {
        Bus {
            devices: BTreeMap::new(),
            space: PhantomData,
        }
    }
}

impl<S: AddressSpace> Clone for Bus<S> {
    fn clone(&self) -> Self {
        Bus {
            devices: self.devices.clone(),
            space: PhantomData,
        }
    }
}

impl<S: AddressSpace> fmt::Debug for Bus<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.devices.keys()).finish()
    }
}

impl<S: AddressSpace> Bus<S> {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `range`.
    ///
    /// # Errors
    ///
    /// [`Error::OutsideAddressSpace`] when `range` runs past the last address of `S` (port
    /// 0xffff), [`Error::Overlap`] when it shares an address with a range already on the bus.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<()> {
        if range.last() > S::LAST {
            return Err(Error::OutsideAddressSpace {
                range,
                space: S::NAME,
                last: S::LAST,
            });
        }
        // Only the neighbours on either side of `range.base` can overlap it.
        let before = self.devices.range(..=range).next_back();
        let after = self.devices.range(range..).next();
        for (existing, _) in before.into_iter().chain(after) {
            if existing.overlaps(&range) {
                return Err(Error::Overlap {
                    new: range,
                    existing: *existing,
                });
            }
        }
        self.devices.insert(range, device);
        Ok(())
    }

    /// Removes the device registered at exactly `range`, returning it.
    pub fn remove(&mut self, range: &BusRange) -> Option<Arc<dyn BusDevice>> {
        self.devices.remove(range)
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the bus holds no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Iterates over the registered ranges in address order.
    pub fn ranges(&self) -> impl Iterator<Item = &BusRange> {
        self.devices.keys()
    }

    /// Finds the device whose range holds `addr`.
    pub fn device_at(&self, addr: u64) -> Option<(&BusRange, &Arc<dyn BusDevice>)> {
        // The candidate is the range with the greatest base not above `addr`. Its length
        // sorts last so that a range starting exactly at `addr` is included.
        let probe = BusRange {
            base: addr,
            len: u64::MAX,
        };
        self.devices
            .range(..=probe)
            .next_back()
            .filter(|(range, _)| range.contains(addr))
    }

    /// Finds the device for an access of `len` bytes at `addr` and checks the access fits it.
    fn resolve(&self, addr: u64, len: usize) -> Result<(&BusRange, &Arc<dyn BusDevice>)> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(Error::InvalidAccessLength(len));
        }
        let (range, device) = self.device_at(addr).ok_or(Error::NoDevice(addr))?;
        // `len` is at most 8, and `addr` is inside `range`; compare the last accessed byte.
        let fits = u64::try_from(len - 1)
            .ok()
            .and_then(|tail| addr.checked_add(tail))
            .is_some_and(|last| last <= range.last());
        if !fits {
            return Err(Error::AccessOutOfRange {
                addr,
                len,
                range: *range,
            });
        }
        Ok((range, device))
    }

    /// Reads `data.len()` bytes at `addr` from the device there.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAccessLength`], [`Error::NoDevice`] or [`Error::AccessOutOfRange`]; the
    /// device is not called then and `data` is left as it was.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<()> {
        let (range, device) = self.resolve(addr, data.len())?;
        device.read(range.base, addr - range.base, data);
        Ok(())
    }

    /// Writes `data` at `addr` to the device there.
    ///
    /// # Errors
    ///
    /// As for [`read`](Self::read); the device is not called then.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let (range, device) = self.resolve(addr, data.len())?;
        device.write(range.base, addr - range.base, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access it saw and answers reads with its offset.
    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDeviceMut for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.last = Some((base, offset, data.to_vec()));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn range_rejects_empty_and_overflowing() {
        assert_eq!(BusRange::new(0x10, 0), Err(Error::EmptyRange));
        assert_eq!(
            BusRange::new(u64::MAX, 2),
            Err(Error::RangeOverflow {
                base: u64::MAX,
                len: 2
            })
        );
        let top = BusRange::new(u64::MAX, 1).unwrap();
        assert_eq!(top.last(), u64::MAX);
        let all = BusRange::new(0, u64::MAX).unwrap();
        assert_eq!(all.last(), u64::MAX - 1);
    }

    #[test]
    fn insert_rejects_overlaps_on_either_side() {
        let mut bus = MmioBus::new();
        bus.insert(BusRange::new(0x100, 0x10).unwrap(), recorder())
            .unwrap();
        for (base, len) in [
            (0x0f8, 0x9),
            (0x10f, 1),
            (0x100, 0x10),
            (0x0, 0x1000),
            (0x104, 2),
        ] {
            let err = bus
                .insert(BusRange::new(base, len).unwrap(), recorder())
                .unwrap_err();
            assert!(matches!(err, Error::Overlap { .. }), "{base:#x}+{len:#x}");
        }
        // Adjacent ranges are fine.
        bus.insert(BusRange::new(0xf0, 0x10).unwrap(), recorder())
            .unwrap();
        bus.insert(BusRange::new(0x110, 0x10).unwrap(), recorder())
            .unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn dispatch_passes_base_and_offset() {
        let mut bus = MmioBus::new();
        let dev = recorder();
        bus.insert(BusRange::new(0x3f8, 8).unwrap(), dev.clone())
            .unwrap();
        bus.write(0x3fb, &[0xab]).unwrap();
        assert_eq!(dev.lock().unwrap().last, Some((0x3f8, 3, vec![0xab])));
        let mut data = [0u8; 2];
        bus.read(0x3fc, &mut data).unwrap();
        assert_eq!(data, [4, 4]);
    }

    #[test]
    fn access_outside_devices_is_an_error() {
        let mut bus = MmioBus::new();
        bus.insert(BusRange::new(0x1000, 0x100).unwrap(), recorder())
            .unwrap();
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0xfff, &mut data), Err(Error::NoDevice(0xfff)));
        assert_eq!(bus.read(0x1100, &mut data), Err(Error::NoDevice(0x1100)));
        assert_eq!(bus.write(0, &[1]), Err(Error::NoDevice(0)));
    }

    #[test]
    fn access_crossing_the_range_end_is_rejected_before_the_device() {
        let mut bus = MmioBus::new();
        let dev = recorder();
        let range = BusRange::new(0x1000, 0x10).unwrap();
        bus.insert(range, dev.clone()).unwrap();
        let mut data = [0u8; 8];
        assert_eq!(
            bus.read(0x100c, &mut data),
            Err(Error::AccessOutOfRange {
                addr: 0x100c,
                len: 8,
                range
            })
        );
        assert!(dev.lock().unwrap().last.is_none());
        // The last 4 bytes are fine.
        bus.read(0x100c, &mut data[..4]).unwrap();
    }

    #[test]
    fn access_lengths_other_than_powers_of_two_up_to_8_are_rejected() {
        let mut bus = MmioBus::new();
        bus.insert(BusRange::new(0, 0x100).unwrap(), recorder())
            .unwrap();
        for len in [0usize, 3, 5, 7, 9, 16] {
            let mut data = vec![0u8; len];
            assert_eq!(
                bus.read(0x10, &mut data),
                Err(Error::InvalidAccessLength(len))
            );
            assert_eq!(bus.write(0x10, &data), Err(Error::InvalidAccessLength(len)));
        }
    }

    #[test]
    fn range_at_top_of_address_space_is_reachable() {
        let mut bus = MmioBus::new();
        bus.insert(BusRange::new(u64::MAX - 7, 8).unwrap(), recorder())
            .unwrap();
        bus.write(u64::MAX - 7, &[0; 8]).unwrap();
        assert!(matches!(
            bus.write(u64::MAX - 3, &[0; 8]),
            Err(Error::AccessOutOfRange { .. })
        ));
        bus.write(u64::MAX, &[0]).unwrap();
    }

    #[test]
    fn remove_frees_the_range() {
        let mut bus = MmioBus::new();
        let range = BusRange::new(0x60, 1).unwrap();
        bus.insert(range, recorder()).unwrap();
        assert!(bus.remove(&range).is_some());
        assert!(bus.is_empty());
        assert_eq!(bus.write(0x60, &[0]), Err(Error::NoDevice(0x60)));
        bus.insert(range, recorder()).unwrap();
    }

    #[test]
    fn shared_devices_work_through_arc() {
        struct Constant;
        impl BusDevice for Constant {
            fn read(&self, _: u64, _: u64, data: &mut [u8]) {
                data.fill(0x5a);
            }
            fn write(&self, _: u64, _: u64, _: &[u8]) {}
        }
        let mut bus = MmioBus::new();
        bus.insert(BusRange::new(0x80, 4).unwrap(), Arc::new(Constant))
            .unwrap();
        let mut data = [0u8; 4];
        bus.read(0x80, &mut data).unwrap();
        assert_eq!(data, [0x5a; 4]);
    }

    #[test]
    fn port_ranges_end_at_port_0xffff() {
        let mut pio = PioBus::new();
        let past = BusRange::new(0xfff8, 9).unwrap();
        assert_eq!(
            pio.insert(past, recorder()),
            Err(Error::OutsideAddressSpace {
                range: past,
                space: "port",
                last: 0xffff
            })
        );
        let far = BusRange::new(0x1_0000, 1).unwrap();
        assert!(matches!(
            pio.insert(far, recorder()),
            Err(Error::OutsideAddressSpace { .. })
        ));
        assert!(pio.is_empty());
        // The last ports are usable, and an access past them hits nothing.
        let dev = recorder();
        pio.insert(BusRange::new(0xfff8, 8).unwrap(), dev.clone())
            .unwrap();
        pio.write(0xffff, &[7]).unwrap();
        assert_eq!(dev.lock().unwrap().last, Some((0xfff8, 7, vec![7])));
        assert!(matches!(
            pio.write(0xfffe, &[0; 4]),
            Err(Error::AccessOutOfRange { .. })
        ));
        assert_eq!(pio.write(0x1_0000, &[0]), Err(Error::NoDevice(0x1_0000)));
        // The same range is fine on an MMIO bus.
        MmioBus::new().insert(past, recorder()).unwrap();
    }

    #[test]
    fn out_of_space_error_names_the_range_and_the_space() {
        let err = PioBus::new()
            .insert(BusRange::new(0xff00, 0x200).unwrap(), recorder())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The bus range [0xff00, 0x100ff] runs past the last port address 0xffff"
        );
    }
}
