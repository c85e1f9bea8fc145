//! The serial target: the guest's register accesses to the 16550A UART of its console, and the
//! VMM's input into its receive FIFO.

use std::collections::VecDeque;

use ember_bus::BusDeviceMut;
use ember_legacy::serial::FIFO_SIZE;
use ember_legacy::{EventFdTrigger, SerialDevice};

use crate::virtio::{take, take_u8};

/// Line control register.
const LCR: u64 = 3;
/// Modem control register.
const MCR: u64 = 4;
/// Line status register.
const LSR: u64 = 5;
/// LCR bit: the divisor latch is at offsets 0 and 1.
const LCR_DLAB: u8 = 0x80;
/// MCR bit: loopback mode.
const MCR_LOOP: u8 = 0x10;
/// LSR bit: the receive buffer holds a byte.
const LSR_DATA_READY: u8 = 0x01;
/// LSR bits: the transmitter holding register is empty and the transmitter idle, always so in
/// the model.
const LSR_TX_EMPTY: u8 = 0x60;

/// What the serial target made of an input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerialOutcome {
    /// Operations carried out.
    pub ops: usize,
    /// Bytes the guest transmitted to the output.
    pub bytes_out: u64,
    /// Input bytes the FIFO took.
    pub bytes_in: u64,
    /// Bytes the guest read from the receive buffer.
    pub bytes_read: usize,
}

/// Drives a serial console, whose output is a buffer, through a sequence of operations.
///
/// Input: operations of three bytes: a kind byte, an offset byte and a value byte. Kind mod 4:
/// 0 a guest read and 1 a guest write at the offset mod 10 (the eight ports and two past
/// them), of one byte, or of two when bit 2 of the kind is set; 2 and 3 queue the next
/// `value mod 80` bytes of the input for the guest, with
/// [`enqueue_input`](SerialDevice::enqueue_input) or [`feed_from`](SerialDevice::feed_from).
///
/// The target keeps a model of the receive FIFO and of the output: the guest must read bytes
/// in the order they were queued, the FIFO must hold at most [`FIFO_SIZE`] of them (the input
/// a guest can make the VMM hold is bounded), the line status must say "data ready" exactly
/// when the FIFO holds a byte, and the output must be what the guest wrote to the transmit
/// register outside loopback mode. An access of another length or past the eighth port must
/// read all ones and change nothing.
///
/// # Panics
///
/// Only on a finding.
pub fn serial(mut data: &[u8]) -> SerialOutcome {
    let data = &mut data;
    let interrupt = EventFdTrigger::new().expect("eventfds are available");
    let mut serial = SerialDevice::new(interrupt, Vec::new()).expect("eventfds are available");
    let mut fifo: VecDeque<u8> = VecDeque::new();
    let mut output: Vec<u8> = Vec::new();
    let mut outcome = SerialOutcome::default();
    while data.len() >= 3 {
        let kind = take_u8(data);
        let offset = u64::from(take_u8(data) % 10);
        let value = take_u8(data);
        let len = if kind & 4 == 0 { 1 } else { 2 };
        let valid = len == 1 && offset < 8;
        let lcr = register(&mut serial, LCR);
        let mcr = register(&mut serial, MCR);
        let dlab = lcr & LCR_DLAB != 0;
        let looped = mcr & MCR_LOOP != 0;
        match kind % 4 {
            0 => {
                let mut bytes = [0u8; 2];
                serial.read(0, offset, &mut bytes[..len]);
                if !valid {
                    assert_eq!(bytes[..len], [0xff, 0xff][..len], "an invalid read");
                } else if offset == 0 && !dlab {
                    let expected = fifo.pop_front();
                    assert_eq!(bytes[0], expected.unwrap_or(0), "the received byte");
                    outcome.bytes_read += usize::from(expected.is_some());
                }
            }
            1 => {
                serial.write(0, offset, &[value, value][..len]);
                if valid && offset == 0 && !dlab {
                    if looped {
                        if fifo.len() < FIFO_SIZE {
                            fifo.push_back(value);
                        }
                    } else {
                        output.push(value);
                    }
                }
            }
            kind => {
                let input = take(data, usize::from(value % 80));
                let taken = if kind == 2 {
                    serial.enqueue_input(input)
                } else {
                    let mut reader = input;
                    serial
                        .feed_from(&mut reader)
                        .expect("a slice reads without error")
                        .read
                };
                let room = if looped { 0 } else { FIFO_SIZE - fifo.len() };
                assert_eq!(taken, input.len().min(room), "input taken");
                fifo.extend(&input[..taken]);
            }
        }
        outcome.ops += 1;
        check_serial(&mut serial, &fifo, &output);
    }
    let stats = serial.stats();
    outcome.bytes_out = stats.bytes_out;
    outcome.bytes_in = stats.bytes_in;
    outcome
}

/// Reads a register that has no side effect on reading.
fn register(serial: &mut SerialDevice<Vec<u8>>, offset: u64) -> u8 {
    let mut byte = [0u8];
    serial.read(0, offset, &mut byte);
    byte[0]
}

fn check_serial(serial: &mut SerialDevice<Vec<u8>>, fifo: &VecDeque<u8>, output: &[u8]) {
    assert!(fifo.len() <= FIFO_SIZE, "the model overflows");
    assert_eq!(
        serial.fifo_capacity(),
        FIFO_SIZE - fifo.len(),
        "the FIFO holds other than what was queued"
    );
    let lsr = register(serial, LSR);
    assert_eq!(
        lsr & LSR_DATA_READY != 0,
        !fifo.is_empty(),
        "LSR {lsr:#x} with {} bytes in the FIFO",
        fifo.len()
    );
    assert_eq!(lsr & LSR_TX_EMPTY, LSR_TX_EMPTY, "LSR {lsr:#x}");
    assert_eq!(serial.writer().as_slice(), output, "the output");
    let stats = serial.stats();
    assert_eq!(stats.bytes_out, output.len() as u64, "bytes out");
    assert_eq!(stats.bytes_lost, 0, "a buffer loses nothing");
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::tests::{Seeds, corpus_dir, replay};

    /// A write of one byte.
    fn write(offset: u8, value: u8) -> [u8; 3] {
        [1, offset, value]
    }

    /// A read of one byte.
    fn read(offset: u8) -> [u8; 3] {
        [0, offset, 0]
    }

    /// Input queued for the guest with `enqueue_input` (or `feed_from`).
    fn input(bytes: &[u8], feed: bool) -> Vec<u8> {
        let mut op = vec![
            if feed { 3 } else { 2 },
            0,
            u8::try_from(bytes.len()).unwrap(),
        ];
        op.extend_from_slice(bytes);
        op
    }

    const fn outcome(
        ops: usize,
        bytes_out: u64,
        bytes_in: u64,
        bytes_read: usize,
    ) -> SerialOutcome {
        SerialOutcome {
            ops,
            bytes_out,
            bytes_in,
            bytes_read,
        }
    }

    /// The serial target's seeds and what it makes of them.
    const SERIAL_SEEDS: &[(&str, SerialOutcome)] = &[
        ("linux-init", outcome(12, 5, 0, 0)),
        ("echo", outcome(10, 2, 2, 2)),
        ("fifo-full", outcome(4, 0, 65, 1)),
        ("loopback", outcome(7, 0, 0, 2)),
        ("invalid-accesses", outcome(3, 0, 0, 0)),
    ];

    fn serial_seeds() -> Seeds {
        // What Linux's 8250 driver does first: the divisor latch, 8n1, FIFOs, DTR|RTS|OUT2,
        // the interrupts; then it writes "hello".
        let linux_init = [
            write(3, 0x80),
            write(0, 0x01),
            write(1, 0x00),
            write(3, 0x03),
            write(2, 0xc7),
            write(4, 0x0b),
            write(1, 0x03),
            write(0, b'h'),
            write(0, b'e'),
            write(0, b'l'),
            write(0, b'l'),
            write(0, b'o'),
        ]
        .concat();
        let mut echo = [write(1, 0x01), read(5)].concat();
        echo.extend(input(b"ab", false));
        echo.extend([read(2), read(5), read(0), read(0), read(5)].concat());
        echo.extend([write(0, b'a'), write(0, b'b')].concat());
        let mut fifo_full = input(&[b'x'; 70], false);
        fifo_full.extend(input(b"yz", true));
        fifo_full.extend(read(0));
        fifo_full.extend(input(b"w", true));
        let mut loopback = [write(4, 0x10), write(0, b'l'), write(0, b'o')].concat();
        loopback.extend(input(b"refused", false));
        loopback.extend([read(0), read(0), write(4, 0x00)].concat());
        let invalid = [[1, 8, 0x55], [4, 0, 0], [5, 0, b'!']].concat();
        vec![
            ("linux-init", linux_init),
            ("echo", echo),
            ("fifo-full", fifo_full),
            ("loopback", loopback),
            ("invalid-accesses", invalid),
        ]
    }

    #[test]
    fn serial_corpus_replays() {
        replay("serial", SERIAL_SEEDS, serial);
    }

    #[test]
    fn serial_seeds_on_disk_are_the_generated_ones() {
        crate::tests::check_seeds(&[("serial", serial_seeds())]);
    }

    /// Writes the seed files. They are checked in; run this only to regenerate them.
    #[test]
    #[ignore = "rewrites the checked-in seed corpus"]
    fn write_serial_seed_corpus() {
        let dir = corpus_dir("serial");
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in serial_seeds() {
            fs::write(dir.join(name), data).unwrap();
        }
    }
}
