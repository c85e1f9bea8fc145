//! ember's buses as a vCPU's [`ExitHandler`] (feature `bus`).
//!
//! [`BusExitHandler`] sends port accesses to a [`PioBus`] and MMIO accesses to an [`MmioBus`].
//! An access that hits no device (or that the bus refuses: a width the device's range cannot
//! hold) does not stop the guest: a write is dropped and a read returns zeros. Such accesses are
//! counted, and logged at debug level when the count is a power of two, so that a guest probing
//! absent devices in a loop cannot flood the log.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ember_bus::{MmioBus, PioBus};

use crate::exit::ExitHandler;

/// Dispatches a VM's port and MMIO accesses to ember's buses; share one among the VM's vCPUs.
#[derive(Debug)]
pub struct BusExitHandler {
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    /// Accesses that hit no device, counted to keep their logging sparse.
    unhandled: AtomicU64,
}

impl BusExitHandler {
    /// A handler sending port accesses to `pio` and MMIO accesses to `mmio`.
    pub fn new(pio: Arc<PioBus>, mmio: Arc<MmioBus>) -> Self {
        BusExitHandler {
            pio,
            mmio,
            unhandled: AtomicU64::new(0),
        }
    }

    /// The port bus.
    pub fn pio(&self) -> &Arc<PioBus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<MmioBus> {
        &self.mmio
    }

    /// How many accesses have hit no device, or were refused by the bus, so far.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    /// Counts an access that failed, and logs it when the count is a power of two.
    fn note_unhandled<A: fmt::LowerHex>(
        &self,
        what: &str,
        addr: A,
        len: usize,
        err: &ember_bus::Error,
    ) {
        let count = self
            .unhandled
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if should_log(count) {
            log::debug!(
                "{what} of {len} bytes at {addr:#x} has no device ({err}); \
                 {count} such accesses so far"
            );
        }
    }
}

/// Whether the `count`th unhandled access is logged: the 1st, 2nd, 4th, 8th...
fn should_log(count: u64) -> bool {
    count.is_power_of_two()
}

impl ExitHandler for BusExitHandler {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Err(err) = self.pio.read(u64::from(port), data) {
            data.fill(0);
            self.note_unhandled("Port read", port, data.len(), &err);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if let Err(err) = self.pio.write(u64::from(port), data) {
            self.note_unhandled("Port write", port, data.len(), &err);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Err(err) = self.mmio.read(addr, data) {
            data.fill(0);
            self.note_unhandled("MMIO read", addr, data.len(), &err);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Err(err) = self.mmio.write(addr, data) {
            self.note_unhandled("MMIO write", addr, data.len(), &err);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ember_bus::{BusDeviceMut, BusRange};

    use super::*;

    /// Answers reads with 0x5a and keeps the last write.
    #[derive(Default)]
    struct Register(Vec<u8>);

    impl BusDeviceMut for Register {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.0 = data.to_vec();
        }
    }

    #[test]
    fn accesses_reach_the_bus_of_their_address_space() {
        let port = Arc::new(Mutex::new(Register::default()));
        let mmio_dev = Arc::new(Mutex::new(Register::default()));
        let mut pio = PioBus::new();
        pio.insert(BusRange::new(0x80, 1).unwrap(), port.clone())
            .unwrap();
        let mut mmio = MmioBus::new();
        mmio.insert(BusRange::new(0x80, 8).unwrap(), mmio_dev.clone())
            .unwrap();
        let handler = BusExitHandler::new(Arc::new(pio), Arc::new(mmio));
        handler.pio_write(0x80, &[1]);
        handler.mmio_write(0x80, &[2, 3]);
        assert_eq!(port.lock().unwrap().0, [1]);
        assert_eq!(mmio_dev.lock().unwrap().0, [2, 3]);
        let mut data = [0u8; 4];
        handler.mmio_read(0x84, &mut data);
        assert_eq!(data, [0x5a; 4]);
        assert_eq!(handler.unhandled(), 0);
    }

    #[test]
    fn accesses_that_hit_nothing_read_zeros_and_are_counted() {
        let handler = BusExitHandler::new(Arc::new(PioBus::new()), Arc::new(MmioBus::new()));
        let mut data = [0xffu8; 2];
        handler.pio_read(0x2f8, &mut data);
        assert_eq!(data, [0, 0]);
        let mut data = [0xffu8; 8];
        handler.mmio_read(0xd000_0000, &mut data);
        assert_eq!(data, [0; 8]);
        handler.pio_write(0x2f8, &[1]);
        handler.mmio_write(0, &[1, 2, 3, 4]);
        assert_eq!(handler.unhandled(), 4);
    }

    #[test]
    fn unhandled_accesses_are_logged_at_powers_of_two() {
        let logged: Vec<u64> = (1..=100).filter(|&count| should_log(count)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
    }
}
