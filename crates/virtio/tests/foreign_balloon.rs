//! The balloon hosted by a VMM that is not ember: the test is that VMM. It owns the event loop
//! (a rust-vmm `EventManager` on a thread of its own), the guest memory (a `GuestMemoryAtomic`)
//! and an MSI-X style interrupt with one vector per queue and one for configuration changes.
//! Through nothing but the crate's public API, the mock guest driver inflates pages, which read
//! as zeros after, reports statistics when the device hands its buffer back, and is told of a
//! new target with a configuration interrupt.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ember_virtio::balloon::{Balloon, BalloonConfig, PAGE_SIZE};
use ember_virtio::mock::{MockBuffer, MockDriver, guest_memory};
use ember_virtio::worker::manager::Subscriber;
use ember_virtio::{ActivateParams, Executor, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use event_manager::EventManager;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

const MEM_SIZE: usize = 0x40_0000;
const ARRAY: u64 = 0x3_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// This VMM's interrupt: a count per queue vector, and one for configuration changes.
#[derive(Default)]
struct Vectors {
    queues: [AtomicU64; 3],
    config: AtomicU64,
}

impl VirtioInterrupt for Vectors {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        let counter = match kind {
            VirtioInterruptType::Queue(i) => self
                .queues
                .get(usize::from(i))
                .ok_or_else(|| io::Error::other("no such vector"))?,
            _ => &self.config,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_foreign_vmm_inflates_polls_and_retargets_a_balloon_in_its_event_loop() {
    let mut manager = EventManager::<Subscriber>::new().unwrap();
    let executor = Executor::EventManager(manager.remote_endpoint());
    let stop = Arc::new(AtomicBool::new(false));
    let event_loop = thread::spawn({
        let stop = stop.clone();
        move || {
            while !stop.load(Ordering::SeqCst) {
                manager.run_with_timeout(10).unwrap();
            }
        }
    });

    let mem: Mem = GuestMemoryAtomic::new(guest_memory(MEM_SIZE).unwrap());
    let mut drivers: Vec<MockDriver> = (0..3u64)
        .map(|i| MockDriver::new(256, GuestAddress(i * 0x8000)))
        .collect();
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let vectors = Arc::new(Vectors::default());
    let balloon = Arc::new(Mutex::new(
        Balloon::new(BalloonConfig::new(1, true, 1)).unwrap(),
    ));
    let features = VirtioDevice::<Mem>::features(&*balloon.lock().unwrap());
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    VirtioDevice::<Mem>::activate(
        &mut *balloon.lock().unwrap(),
        ActivateParams::new(
            mem.clone(),
            features,
            drivers.iter().map(MockDriver::queue).collect(),
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            vectors.clone(),
            executor,
        ),
    )
    .unwrap();

    // The guest wrote two pages, then puts them in the balloon.
    let guest = mem.memory();
    let page = 0x100u64;
    guest
        .write_slice(
            &[0x5a; 2 * PAGE_SIZE as usize],
            GuestAddress(page * PAGE_SIZE),
        )
        .unwrap();
    let pfns: Vec<u8> = [page as u32, page as u32 + 1]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    guest.write_slice(&pfns, GuestAddress(ARRAY)).unwrap();
    drivers[0]
        .add_chain(&*guest, &[MockBuffer::readable(ARRAY, 8)])
        .unwrap();
    kicks[0].write(1).unwrap();
    wait_for("the inflate queue", || {
        vectors.queues[0].load(Ordering::SeqCst) > 0
    });
    let mut back = vec![0xffu8; 2 * PAGE_SIZE as usize];
    guest
        .read_slice(&mut back, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert!(back.iter().all(|&b| b == 0));

    // The driver reports 1 MiB free; the device hands the buffer back within a second.
    let mut stat = 4u16.to_le_bytes().to_vec();
    stat.extend_from_slice(&(1u64 << 20).to_le_bytes());
    guest
        .write_slice(&stat, GuestAddress(ARRAY + 0x100))
        .unwrap();
    drivers[2]
        .add_chain(&*guest, &[MockBuffer::readable(ARRAY + 0x100, 10)])
        .unwrap();
    kicks[2].write(1).unwrap();
    wait_for("the statistics poll", || {
        vectors.queues[2].load(Ordering::SeqCst) > 0
    });
    assert_eq!(
        balloon.lock().unwrap().stats().guest.free_memory,
        Some(1 << 20)
    );

    // A new target reaches the driver as a configuration change.
    balloon.lock().unwrap().set_target_mib(2).unwrap();
    assert_eq!(vectors.config.load(Ordering::SeqCst), 1);
    let mut num_pages = [0u8; 4];
    VirtioDevice::<Mem>::read_config(&*balloon.lock().unwrap(), 0, &mut num_pages);
    assert_eq!(u32::from_le_bytes(num_pages), 512);
    let used = drivers[0].used_ring().unchecked_add(2);
    assert_eq!(guest.read_obj::<u16>(used).unwrap(), 1);

    VirtioDevice::<Mem>::reset(&mut *balloon.lock().unwrap());
    stop.store(true, Ordering::SeqCst);
    event_loop.join().unwrap();
}
