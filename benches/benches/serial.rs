//! The serial console's hot paths: the guest transmitting a byte, and the VMM queueing input.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ember_bus::BusDeviceMut;
use ember_legacy::{COM1_PORT, EventFdTrigger, FIFO_SIZE, SerialDevice, SerialOut};

/// Register offsets of the 16550A.
const DATA: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
/// Interrupt enable bit of "transmitter holding register empty".
const IER_THR_EMPTY: u8 = 0x02;

fn serial() -> SerialDevice<SerialOut> {
    let interrupt = EventFdTrigger::new().expect("cannot create an eventfd");
    SerialDevice::new(interrupt, SerialOut::sink()).expect("cannot create an eventfd")
}

/// How many times the device signalled its interrupt line since last asked.
fn signals(serial: &SerialDevice<SerialOut>) -> u64 {
    let eventfd = serial.interrupt().eventfd();
    eventfd.read().expect("the interrupt line was signalled")
}

/// Reads the data register until the receive FIFO is empty, as the guest's driver does.
fn drain(serial: &mut SerialDevice<SerialOut>) {
    let mut byte = [0u8];
    while serial.fifo_capacity() < FIFO_SIZE {
        serial.read(COM1_PORT, DATA, &mut byte);
    }
}

fn bench_transmit(c: &mut Criterion) {
    let mut group = c.benchmark_group("serial/transmit");
    // Interrupts off, as when the guest polls the line status register between bytes.
    let mut polled = serial();
    group.bench_function("polled", |b| {
        b.iter(|| polled.write(COM1_PORT, DATA, black_box(b"x")))
    });
    // The "transmitter empty" interrupt on, as Linux's 8250 driver transmits: each byte signals
    // the interrupt eventfd, and the guest's handler acknowledges it by reading IIR.
    let mut irq = serial();
    irq.write(COM1_PORT, IER, &[IER_THR_EMPTY]);
    let mut iir = [0u8];
    irq.read(COM1_PORT, IIR, &mut iir);
    assert_eq!(signals(&irq), 1, "enabling the interrupt raises it");
    // What is measured below: a byte raises the acknowledged interrupt again.
    irq.write(COM1_PORT, DATA, b"x");
    irq.read(COM1_PORT, IIR, &mut iir);
    assert_eq!(signals(&irq), 1, "the byte raises the interrupt");
    group.bench_function("irq_and_iir_read", |b| {
        b.iter(|| {
            irq.write(COM1_PORT, DATA, black_box(b"x"));
            irq.read(COM1_PORT, IIR, &mut iir);
        })
    });
    group.finish();
}

fn bench_input(c: &mut Criterion) {
    let input = [b'a'; FIFO_SIZE];
    let primed = || {
        let mut serial = serial();
        assert_eq!(serial.enqueue_input(&input), FIFO_SIZE);
        drain(&mut serial);
        serial
    };
    // What is measured below fills the FIFO, which holds exactly the input.
    assert_eq!(primed().enqueue_input(&input), FIFO_SIZE);
    let mut group = c.benchmark_group("serial/input");
    // Filling the empty FIFO. Each iteration needs an empty FIFO, so it gets its own device, one
    // that has already taken and given back a FIFO-full so that the FIFO's buffer is allocated.
    group.bench_function("enqueue_64", |b| {
        b.iter_batched_ref(
            primed,
            |serial| serial.enqueue_input(black_box(&input)),
            BatchSize::NumIterations(64),
        )
    });
    // Queueing a FIFO-full and the guest reading it back a byte at a time.
    let mut serial = serial();
    group.bench_function("enqueue_64_and_guest_reads", |b| {
        b.iter(|| {
            serial.enqueue_input(black_box(&input));
            drain(&mut serial);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_transmit, bench_input);
criterion_main!(benches);
