//! The virtqueue's device side: taking a chain the driver made available ([`Queue::pop`]) and
//! handing it back ([`Queue::add_used`]), for chains of one and of three descriptors, with the
//! rings looked up on each access or once per batch ([`Queue::rings`], `_rings`).
//!
//! The mock driver fills the ring outside the timed part, so the numbers are the device's work
//! alone: reading the available index and ring entry, walking and validating the descriptors,
//! writing the used element and publishing the used index.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ember_virtqueue::Queue;
use ember_virtqueue::mock::{MockBuffer, MockDriver, guest_memory};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;

/// A request as a block driver lays it out: a header, a data buffer, a status byte.
const THREE: [MockBuffer; 3] = [
    MockBuffer {
        addr: GuestAddress(0x10000),
        len: 16,
        writable: false,
    },
    MockBuffer {
        addr: GuestAddress(0x11000),
        len: 4096,
        writable: true,
    },
    MockBuffer {
        addr: GuestAddress(0x12000),
        len: 1,
        writable: true,
    },
];

struct Ring {
    mem: GuestMemoryMmap<()>,
    driver: MockDriver,
    queue: Queue,
}

impl Ring {
    fn new() -> Self {
        let mem = guest_memory(0x100000).expect("cannot map guest memory");
        let driver = MockDriver::new(QUEUE_SIZE, GuestAddress(0));
        let queue = driver.queue();
        queue
            .validate(&mem)
            .expect("the mock driver lays out a valid queue");
        Ring { mem, driver, queue }
    }

    /// Publishes as many `chain`s as the descriptor table holds, untimed, then times popping
    /// and handing back each of them; repeats until `iters` chains are done. With `batch`, the
    /// rings are looked up once for each fill ([`Queue::rings`], as a device does for each
    /// pass over its queue); without, on each access ([`Queue::pop`], [`Queue::add_used`]).
    fn time(&mut self, chain: &[MockBuffer], batch: bool, iters: u64) -> Duration {
        let per_fill = u64::from(QUEUE_SIZE) / u64::try_from(chain.len()).expect("short chain");
        let mut elapsed = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(per_fill);
            for _ in 0..count {
                self.driver
                    .add_chain(&self.mem, chain)
                    .expect("the ring is in guest memory");
            }
            let start = Instant::now();
            if batch {
                let mut rings = self.queue.rings(&self.mem);
                for _ in 0..count {
                    let chain = rings
                        .pop()
                        .expect("the chain is valid")
                        .expect("a chain is available");
                    rings
                        .add_used(black_box(chain.head_index()), 0)
                        .expect("the used ring is in guest memory");
                }
            } else {
                for _ in 0..count {
                    let chain = self
                        .queue
                        .pop(&self.mem)
                        .expect("the chain is valid")
                        .expect("a chain is available");
                    self.queue
                        .add_used(&self.mem, black_box(chain.head_index()), 0)
                        .expect("the used ring is in guest memory");
                }
            }
            elapsed += start.elapsed();
            left -= count;
        }
        elapsed
    }
}

fn bench_pop_add_used(c: &mut Criterion) {
    let mut group = c.benchmark_group("virtqueue/pop_add_used");
    let one = [MockBuffer::readable(0x10000, 64)];
    for (name, chain) in [("1_descriptor", &one[..]), ("3_descriptors", &THREE[..])] {
        for batch in [false, true] {
            let mut ring = Ring::new();
            // What is measured below hands every chain back.
            ring.time(chain, batch, 1000);
            let used = ring
                .driver
                .used_idx(&ring.mem)
                .expect("the used ring is readable");
            assert_eq!(used, 1000);
            let name = if batch {
                format!("{name}_rings")
            } else {
                name.to_owned()
            };
            group.bench_function(name, |b| {
                b.iter_custom(|iters| ring.time(chain, batch, iters))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pop_add_used);
criterion_main!(benches);
