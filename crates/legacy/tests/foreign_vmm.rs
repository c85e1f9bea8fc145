//! ember-legacy's devices in another VMM: interrupts and requests go through the VMM's own
//! vm-superio `Trigger` (here one that records what fired, as an MSI or a userspace interrupt
//! controller would), and accesses come from the VMM's own port dispatch, not from ember's bus.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_bus::BusDeviceMut;
use ember_legacy::{AcpiPmDevice, COM1_PORT, I8042_PORT, I8042Device, SerialDevice, Trigger};

/// Counts how many times it fired, in a counter its clones share.
#[derive(Clone, Debug, Default)]
struct Line(Arc<AtomicUsize>);

impl Line {
    fn fired(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Trigger for Line {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The foreign VMM's port dispatch: a match on the port, then the device's registers.
struct Ports {
    serial: SerialDevice<Vec<u8>, Line>,
    i8042: I8042Device<Line>,
    pm: AcpiPmDevice<Line>,
}

/// The PM1 block of this VMM's ACPI tables, elsewhere than ember's.
const PM_PORT: u64 = 0xb000;
/// The soft-off sleep type this VMM's DSDT declares.
const SOFT_OFF: u16 = 5;

impl Ports {
    fn out(&mut self, port: u64, data: &[u8]) {
        match port {
            COM1_PORT..=0x3ff => self.serial.write(COM1_PORT, port - COM1_PORT, data),
            0x60..=0x64 => self.i8042.write(I8042_PORT, port - I8042_PORT, data),
            PM_PORT..=0xb005 => self.pm.write(PM_PORT, port - PM_PORT, data),
            _ => {}
        }
    }

    fn inb(&mut self, port: u64) -> u8 {
        let mut data = [0u8];
        match port {
            COM1_PORT..=0x3ff => self.serial.read(COM1_PORT, port - COM1_PORT, &mut data),
            0x60..=0x64 => self.i8042.read(I8042_PORT, port - I8042_PORT, &mut data),
            _ => data[0] = 0xff,
        }
        data[0]
    }
}

fn machine() -> (Ports, Line, Line, Line, Line) {
    let (serial_irq, reset, kbd_irq, power_off) = Default::default();
    let ports = Ports {
        serial: SerialDevice::new(Line::clone(&serial_irq), Vec::new()).unwrap(),
        i8042: I8042Device::new(Line::clone(&reset), Line::clone(&kbd_irq)),
        pm: AcpiPmDevice::new(Line::clone(&power_off), SOFT_OFF),
    };
    (ports, serial_irq, reset, kbd_irq, power_off)
}

#[test]
fn the_serial_console_interrupts_through_the_vmm_trigger() {
    let (mut ports, serial_irq, ..) = machine();
    // The guest enables the received-data and transmitter-empty interrupts, then transmits.
    ports.out(COM1_PORT + 1, &[0x03]);
    ports.out(COM1_PORT, b"h");
    ports.out(COM1_PORT, b"i");
    assert_eq!(ports.serial.writer().as_slice(), b"hi");
    assert!(serial_irq.fired() > 0);
    // The guest reads the interrupt identification register, which clears the pending
    // transmitter-empty interrupt.
    ports.inb(COM1_PORT + 2);

    // The VMM feeds input: data ready in the line status register, the interrupt fires, and the
    // guest reads the bytes back in order.
    let before = serial_irq.fired();
    assert_eq!(ports.serial.enqueue_input(b"ok"), 2);
    assert!(serial_irq.fired() > before);
    assert_eq!(ports.inb(COM1_PORT + 5) & 0x01, 0x01);
    assert_eq!(ports.inb(COM1_PORT), b'o');
    assert_eq!(ports.inb(COM1_PORT), b'k');
    assert_eq!(ports.inb(COM1_PORT + 5) & 0x01, 0);
}

#[test]
fn a_guest_reset_and_ctrl_alt_del_go_through_the_vmm_triggers() {
    let (mut ports, _, reset, kbd_irq, _) = machine();
    ports.i8042.trigger_ctrl_alt_del().unwrap();
    assert!(kbd_irq.fired() > 0);
    assert_eq!(reset.fired(), 0);
    // The guest pulses the CPU reset line (command 0xfe on the command port).
    ports.out(0x64, &[0xfe]);
    assert_eq!(reset.fired(), 1);
}

#[test]
fn the_soft_off_sleep_type_of_the_vmm_tables_powers_off() {
    let (mut ports, .., power_off) = machine();
    let slp_en = 1u16 << 13;
    // Another sleep type does nothing.
    ports.out(PM_PORT + 4, &((3 << 10) | slp_en).to_le_bytes());
    assert_eq!(power_off.fired(), 0);
    ports.out(PM_PORT + 4, &((SOFT_OFF << 10) | slp_en).to_le_bytes());
    assert_eq!(power_off.fired(), 1);
}

/// The machine's device states as the VMM's snapshot carries them, in its own encoding.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    serial: ember_legacy::SerialState,
    i8042: ember_legacy::I8042State,
    pm: ember_legacy::AcpiPmState,
}

#[test]
fn a_snapshot_moves_the_devices_to_a_new_machine_with_its_own_triggers() {
    let (mut ports, ..) = machine();
    // The guest enables the received-data interrupt; input and a key wait when it is paused.
    ports.out(COM1_PORT + 1, &[0x01]);
    assert_eq!(ports.serial.enqueue_input(b"in"), 2);
    ports.i8042.trigger_ctrl_alt_del().unwrap();
    ports.out(PM_PORT + 2, &0x0100u16.to_le_bytes());
    let snapshot = Snapshot {
        serial: ports.serial.save_state(),
        i8042: ports.i8042.save_state(),
        pm: ports.pm.save_state(),
    };
    let bytes = postcard::to_allocvec(&snapshot).unwrap();

    let (mut restored, serial_irq, _, kbd_irq, power_off) = machine();
    let snapshot: Snapshot = postcard::from_bytes(&bytes).unwrap();
    restored.serial.restore_state(&snapshot.serial).unwrap();
    restored.i8042.restore_state(&snapshot.i8042).unwrap();
    restored.pm.restore_state(&snapshot.pm).unwrap();
    // The pending interrupts reach the new machine's lines.
    assert_eq!(serial_irq.fired(), 1);
    assert_eq!(kbd_irq.fired(), 1);
    assert_eq!(restored.inb(COM1_PORT), b'i');
    assert_eq!(restored.inb(COM1_PORT), b'n');
    assert_eq!(restored.inb(0x60), 0x14);
    restored.out(PM_PORT + 4, &((SOFT_OFF << 10) | (1 << 13)).to_le_bytes());
    assert_eq!(power_off.fired(), 1);
}
