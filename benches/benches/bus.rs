//! Bus dispatch: finding the device for a vCPU's port I/O or MMIO exit among 32 on each bus, and
//! calling it.
//!
//! Every device is the same trivial register behind `Arc<Mutex<_>>`, as real devices are put on a
//! bus, so the numbers are the bus lookup, the access checks and the lock.

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{Criterion, criterion_group, criterion_main};
use ember_bus::{AddressSpace, Bus, BusDeviceMut, BusRange, MmioBus, PioBus};

/// A register that keeps the last value written and returns it on reads.
#[derive(Debug, Default)]
struct Register(u64);

impl BusDeviceMut for Register {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        let len = data.len();
        data.copy_from_slice(&self.0.to_le_bytes()[..len]);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        self.0 = u64::from_le_bytes(bytes);
    }
}

fn bus_with<S: AddressSpace>(ranges: &[(u64, u64)]) -> Bus<S> {
    let mut bus = Bus::new();
    for &(base, len) in ranges {
        let range = BusRange::new(base, len).expect("the ranges are valid");
        bus.insert(range, Arc::new(Mutex::new(Register::default())))
            .expect("the ranges do not overlap");
    }
    bus
}

/// 32 port ranges: the ten a PC has in known places (PIT, i8042, RTC, POST, the four UARTs, PCI
/// configuration and fw_cfg), then 22 more of 8 ports from 0x1000.
fn pio_bus() -> PioBus {
    let mut ranges = vec![
        (0x40, 4),
        (0x60, 5),
        (0x70, 2),
        (0x80, 1),
        (0x2e8, 8),
        (0x2f8, 8),
        (0x3e8, 8),
        (0x3f8, 8),
        (0x510, 2),
        (0xcf8, 8),
    ];
    ranges.extend((0..22).map(|i| (0x1000 + i * 8, 8)));
    bus_with(&ranges)
}

/// First address of the MMIO buses' 32 slots of 4 KiB, as virtio-mmio devices take them.
const MMIO_BASE: u64 = 0xd000_0000;

fn mmio_bus() -> MmioBus {
    let slots: Vec<(u64, u64)> = (0..32).map(|i| (MMIO_BASE + i * 0x1000, 0x1000)).collect();
    bus_with(&slots)
}

/// Benchmarks a read and a write of `len` bytes at `addr` on `bus`.
fn bench_access<S: AddressSpace>(
    c: &mut Criterion,
    group: &str,
    bus: &Bus<S>,
    addr: u64,
    len: usize,
) {
    let mut group = c.benchmark_group(group);
    let mut data = [0u8; 8];
    let data = &mut data[..len];
    group.bench_function(format!("read_{len}"), |b| {
        b.iter(|| bus.read(black_box(addr), black_box(&mut *data)).unwrap())
    });
    group.bench_function(format!("write_{len}"), |b| {
        b.iter(|| bus.write(black_box(addr), black_box(&*data)).unwrap())
    });
    group.finish();
}

fn bench_pio(c: &mut Criterion) {
    let bus = pio_bus();
    // COM1's line status register, and the PCI configuration address register.
    bench_access(c, "bus/pio", &bus, 0x3fd, 1);
    bench_access(c, "bus/pio", &bus, 0xcf8, 4);
}

fn bench_mmio(c: &mut Criterion) {
    let bus = mmio_bus();
    // A register of the 21st slot: a virtio-mmio device's status is at 0x70.
    let addr = MMIO_BASE + 20 * 0x1000 + 0x70;
    bench_access(c, "bus/mmio", &bus, addr, 1);
    bench_access(c, "bus/mmio", &bus, addr, 4);
}

criterion_group!(benches, bench_pio, bench_mmio);
criterion_main!(benches);
