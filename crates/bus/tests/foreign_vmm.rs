//! ember-bus under another VMM: its devices are its own (one shared through `&self` with atomics,
//! one behind a `Mutex`), its exit loop is its own, and it decides what an access that the bus
//! refuses does on its platform.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ember_bus::{BusDevice, BusDeviceMut, BusRange, Error, MmioBus, PioBus};

/// A doorbell register a vCPU rings without a lock: the last value written, readable.
#[derive(Default)]
struct Doorbell(AtomicU32);

impl BusDevice for Doorbell {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        let value = self.0.load(Ordering::SeqCst).to_le_bytes();
        for (out, byte) in data.iter_mut().zip(value.iter().cycle()) {
            *out = *byte;
        }
    }

    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        for (slot, byte) in value.iter_mut().zip(data) {
            *slot = *byte;
        }
        self.0.store(u32::from_le_bytes(value), Ordering::SeqCst);
    }
}

/// A scratch page of RAM-like registers.
struct Scratch([u8; 0x100]);

impl BusDeviceMut for Scratch {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let at = usize::try_from(offset).unwrap();
        data.copy_from_slice(&self.0[at..at + data.len()]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let at = usize::try_from(offset).unwrap();
        self.0[at..at + data.len()].copy_from_slice(data);
    }
}

/// The exits of the VMM's vCPU loop.
enum Exit<'a> {
    In(u16, &'a mut [u8]),
    Out(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
}

/// The VMM's dispatch: what the bus refuses reads as all ones and writes go nowhere, as on a PC.
fn dispatch(pio: &PioBus, mmio: &MmioBus, exit: Exit<'_>) -> Option<Error> {
    match exit {
        Exit::In(port, data) => pio
            .read(u64::from(port), data)
            .err()
            .inspect(|_| data.fill(0xff)),
        Exit::Out(port, data) => pio.write(u64::from(port), data).err(),
        Exit::MmioRead(addr, data) => mmio.read(addr, data).err().inspect(|_| data.fill(0xff)),
        Exit::MmioWrite(addr, data) => mmio.write(addr, data).err(),
    }
}

fn machine() -> (PioBus, MmioBus, Arc<Doorbell>) {
    let doorbell = Arc::new(Doorbell::default());
    let mut pio = PioBus::new();
    pio.insert(BusRange::new(0xcf8, 4).unwrap(), doorbell.clone())
        .unwrap();
    let mut mmio = MmioBus::new();
    mmio.insert(
        BusRange::new(0xfe00_0000, 0x100).unwrap(),
        Arc::new(Mutex::new(Scratch([0; 0x100]))),
    )
    .unwrap();
    mmio.insert(BusRange::new(0xfe00_1000, 4).unwrap(), doorbell.clone())
        .unwrap();
    (pio, mmio, doorbell)
}

#[test]
fn a_foreign_exit_loop_reaches_its_own_devices_on_both_buses() {
    let (pio, mmio, doorbell) = machine();
    assert!(dispatch(&pio, &mmio, Exit::Out(0xcf8, &[0x2a, 0, 0, 0x80])).is_none());
    assert_eq!(doorbell.0.load(Ordering::SeqCst), 0x8000_002a);
    // The same device answers on the MMIO bus too.
    let mut data = [0u8; 4];
    assert!(dispatch(&pio, &mmio, Exit::MmioRead(0xfe00_1000, &mut data)).is_none());
    assert_eq!(u32::from_le_bytes(data), 0x8000_002a);

    assert!(
        dispatch(
            &pio,
            &mmio,
            Exit::MmioWrite(0xfe00_0010, &[1, 2, 3, 4, 5, 6, 7, 8])
        )
        .is_none()
    );
    let mut data = [0u8; 2];
    assert!(dispatch(&pio, &mmio, Exit::MmioRead(0xfe00_0012, &mut data)).is_none());
    assert_eq!(data, [3, 4]);
}

#[test]
fn what_the_bus_refuses_the_vmm_answers_its_own_way() {
    let (pio, mmio, _) = machine();
    let mut data = [0u8; 2];
    assert!(matches!(
        dispatch(&pio, &mmio, Exit::In(0x60, &mut data)),
        Some(Error::NoDevice(0x60))
    ));
    assert_eq!(data, [0xff; 2]);
    // An access that starts inside a device and runs past its end reaches no device.
    let mut data = [0u8; 8];
    assert!(matches!(
        dispatch(&pio, &mmio, Exit::MmioRead(0xfe00_00fc, &mut data)),
        Some(Error::AccessOutOfRange { .. })
    ));
    assert_eq!(data, [0xff; 8]);
    let mut data = [0u8; 3];
    assert!(matches!(
        dispatch(&pio, &mmio, Exit::In(0xcf8, &mut data)),
        Some(Error::InvalidAccessLength(3))
    ));
}

#[test]
fn a_port_range_past_0xffff_is_refused_and_an_mmio_one_is_not() {
    let mut pio = PioBus::new();
    let range = BusRange::new(0xfff8, 0x10).unwrap();
    assert!(matches!(
        pio.insert(range, Arc::new(Doorbell::default())),
        Err(Error::OutsideAddressSpace { .. })
    ));
    let mut mmio = MmioBus::new();
    assert!(mmio.insert(range, Arc::new(Doorbell::default())).is_ok());
}
