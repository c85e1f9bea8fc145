//! ember-virtqueue under a device of another VMM: the device keeps its queue, set up from the
//! register writes of its own transport, in guest memory of its own (a vm-memory
//! `GuestMemoryMmap` with two regions and a dirty bitmap), and decides itself when to interrupt.
//! The guest side is the crate's mock driver.

use ember_virtqueue::mock::{DESC_F_NEXT, MockBuffer, MockDriver, RawDescriptor};
use ember_virtqueue::{Error, GuestIoVecs, Queue};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

type Memory = GuestMemoryMmap<AtomicBitmap>;

const QUEUE_SIZE: u16 = 8;
/// Where the driver lays out its rings: in the second region.
const RINGS: u64 = 0x10_0000;

/// A device of a foreign VMM: it adds up the little-endian `u32`s the driver gives it and
/// writes the sum back.
struct Adder {
    queue: Queue,
    interrupts: usize,
}

impl Adder {
    /// Builds the queue from what the driver wrote to the (foreign) transport's registers.
    fn activate(mem: &Memory, driver: &MockDriver, event_idx: bool) -> Self {
        let mut queue = Queue::new(QUEUE_SIZE);
        queue.set_size(driver.size());
        queue.set_desc_table(driver.desc_table());
        queue.set_avail_ring(driver.avail_ring());
        queue.set_used_ring(driver.used_ring());
        queue.set_event_idx(event_idx);
        queue.set_indirect(true);
        queue.set_ready(true);
        queue.validate(mem).expect("the driver's rings are valid");
        Adder {
            queue,
            interrupts: 0,
        }
    }

    /// Serves every available chain; returns the errors of the chains it refused.
    fn serve(&mut self, mem: &Memory) -> Vec<Error> {
        let mut refused = Vec::new();
        loop {
            let chain = match self.queue.pop(mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(err) => {
                    refused.push(err);
                    continue;
                }
            };
            let mut sum = 0u32;
            let mut word = [0u8; 4];
            let mut offset = 0;
            while chain.read_at(mem, offset, &mut word).unwrap_or(0) == 4 {
                sum = sum.wrapping_add(u32::from_le_bytes(word));
                offset += 4;
            }
            let written = chain.write_from(mem, &sum.to_le_bytes()).unwrap();
            self.queue
                .add_used(mem, chain.head_index(), u32::try_from(written).unwrap())
                .unwrap();
        }
        if self.queue.needs_notification(mem).unwrap() {
            self.interrupts += 1;
        }
        refused
    }
}

fn memory() -> Memory {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(RINGS), 0x10_0000),
    ])
    .unwrap()
}

fn put_words(mem: &Memory, addr: u64, words: &[u32]) {
    for (i, word) in (0u64..).zip(words) {
        mem.write_obj(word.to_le_bytes(), GuestAddress(addr + 4 * i))
            .unwrap();
    }
}

fn read_sum(mem: &Memory, addr: u64) -> u32 {
    u32::from_le_bytes(mem.read_obj(GuestAddress(addr)).unwrap())
}

#[test]
fn a_foreign_device_serves_direct_and_indirect_chains_across_regions() {
    let mem = memory();
    let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(RINGS));
    let mut adder = Adder::activate(&mem, &driver, false);

    put_words(&mem, 0x1000, &[1, 2, 3]);
    put_words(&mem, 0x2000, &[10, 20]);
    driver
        .add_chain(
            &mem,
            &[
                MockBuffer::readable(0x1000, 12),
                MockBuffer::writable(0x3000, 4),
            ],
        )
        .unwrap();
    // An indirect table in the first region, its buffers split across both.
    driver
        .add_indirect_chain(
            &mem,
            GuestAddress(0x8000),
            &[
                MockBuffer::readable(0x2000, 8),
                MockBuffer::writable(RINGS + 0x8000, 4),
            ],
        )
        .unwrap();

    assert!(adder.serve(&mem).is_empty());
    assert_eq!(read_sum(&mem, 0x3000), 6);
    assert_eq!(read_sum(&mem, RINGS + 0x8000), 30);
    assert_eq!(driver.used_idx(&mem).unwrap(), 2);
    assert_eq!(driver.used_elem(&mem, 1).unwrap().1, 4);
    assert_eq!(adder.interrupts, 1);
}

#[test]
fn a_foreign_device_interrupts_only_when_the_driver_asks_with_event_idx() {
    let mem = memory();
    let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(RINGS));
    let mut adder = Adder::activate(&mem, &driver, true);
    let request = [
        MockBuffer::readable(0x1000, 4),
        MockBuffer::writable(0x3000, 4),
    ];
    driver.add_chain(&mem, &request).unwrap();
    adder.serve(&mem);
    assert_eq!(adder.interrupts, 1, "the first used entry is signalled");
    // The driver wants the next interrupt once the used entry of index 2 is written.
    driver.set_used_event(&mem, 2).unwrap();
    driver.add_chain(&mem, &request).unwrap();
    adder.serve(&mem);
    assert_eq!(adder.interrupts, 1, "used_event not reached");
    driver.add_chain(&mem, &request).unwrap();
    adder.serve(&mem);
    assert_eq!(adder.interrupts, 2);
}

#[test]
fn a_looping_chain_is_refused_and_the_device_goes_on() {
    let mem = memory();
    let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(RINGS));
    let mut adder = Adder::activate(&mem, &driver, false);
    // Descriptors 0 and 1 point at each other: a chain without end.
    for (index, next) in [(0u16, 1u16), (1, 0)] {
        driver
            .write_descriptor(
                &mem,
                index,
                RawDescriptor {
                    addr: 0x1000,
                    len: 4,
                    flags: DESC_F_NEXT,
                    next,
                },
            )
            .unwrap();
    }
    driver.publish(&mem, 0).unwrap();
    let refused = adder.serve(&mem);
    assert!(
        matches!(refused.as_slice(), [Error::ChainTooLong { .. }]),
        "{refused:?}"
    );
    assert_eq!(driver.used_idx(&mem).unwrap(), 0);
}

#[test]
fn chain_buffers_become_host_iovecs_and_writes_are_marked_dirty() {
    let mem = memory();
    let mut driver = MockDriver::new(QUEUE_SIZE, GuestAddress(RINGS));
    let mut adder = Adder::activate(&mem, &driver, false);
    driver
        .add_chain(
            &mem,
            &[
                MockBuffer::writable(0x4000, 16),
                MockBuffer::writable(RINGS + 0x9000, 16),
                // Across the two regions: two iovecs.
                MockBuffer::writable(RINGS - 8, 16),
            ],
        )
        .unwrap();
    let chain = adder.queue.pop(&mem).unwrap().expect("a chain");
    let iovecs = GuestIoVecs::new(&mem, chain.writable().copied(), Permissions::Write).unwrap();
    assert_eq!(iovecs.iovecs().len(), 4);
    assert_eq!(iovecs.len(), 48);
    iovecs.mark_written(48);
    let dirty = |addr: u64| {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let region = mem.find_region(GuestAddress(addr)).unwrap();
        let offset = addr - region.start_addr().0;
        region.bitmap().dirty_at(usize::try_from(offset).unwrap())
    };
    assert!(dirty(0x4000));
    assert!(dirty(RINGS + 0x9000));
    assert!(dirty(RINGS - 8));
    assert!(!dirty(0x5000));
}
